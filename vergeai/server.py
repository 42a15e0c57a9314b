"""Run the app under Hypercorn: config, admin socket, signals, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config

from vergeai.api.admin import remove_socket, start_admin_server
from vergeai.api.app import create_app
from vergeai.runtime.llama import init_backend
from vergeai.service import Service
from vergeai.state.config import ServerConfig

log = logging.getLogger("vergeai.server")


def hypercorn_config(opts: ServerConfig) -> Config:
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


def listen_url(opts: ServerConfig) -> str:
    scheme = "https" if opts.certfile else "http"
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"{scheme}://{host}:{opts.port}"


async def run(service: Service, opts: ServerConfig) -> None:
    init_backend(opts.log_level == "debug")
    state_dir = service.store.root
    service.store.ensure()
    admin = await start_admin_server(service, state_dir, [listen_url(opts)])
    service.refresh(force=True)
    app = create_app(service, metrics_public=opts.metrics_public)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: service.refresh(force=True))
    watcher = asyncio.ensure_future(service.watch())
    log.info("vergeai listening on %s/v1", listen_url(opts))
    try:
        await serve(app, hypercorn_config(opts), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        log.info("stopping: in-flight requests have finished or timed out")
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if admin is not None:
            admin.close()
        remove_socket(state_dir)
        await asyncio.to_thread(service.pool.close, opts.grace_seconds)
        service.flush_usage()
        log.info("vergeai stopped")
