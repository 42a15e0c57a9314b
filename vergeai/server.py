"""Run the app under Hypercorn: config, signals, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config

from vergeai.api.app import create_app
from vergeai.runtime.llama import init_backend
from vergeai.service import Service

log = logging.getLogger("vergeai.server")


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    certfile: str | None = None
    keyfile: str | None = None
    grace_seconds: float = 30.0


def hypercorn_config(opts: ServerOptions) -> Config:
    config = Config()
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    config.bind = [f"{host}:{opts.port}"]
    config.certfile = opts.certfile
    config.keyfile = opts.keyfile
    config.graceful_timeout = opts.grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    return config


async def run(service: Service, opts: ServerOptions, verbose_llama: bool = False) -> None:
    init_backend(verbose_llama)
    service.store.ensure()
    service.refresh(force=True)
    app = create_app(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: service.refresh(force=True))
    watcher = asyncio.ensure_future(service.watch())
    scheme = "https" if opts.certfile else "http"
    log.info("vergeai listening on %s://%s:%d/v1", scheme, opts.host, opts.port)
    try:
        await serve(app, hypercorn_config(opts), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await asyncio.to_thread(service.pool.close, opts.grace_seconds)
        log.info("vergeai stopped")
