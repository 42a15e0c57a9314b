"""Run the app under Hypercorn: config, admin socket, signals, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import hypercorn.asyncio.run
import hypercorn.asyncio.tcp_server
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from vergeai.api.admin import remove_socket, start_admin_server
from vergeai.api.app import create_app
from vergeai.errors import StateError, Unavailable, error_body
from vergeai.runtime.llama import init_backend
from vergeai.service import Service
from vergeai.state.config import ServerConfig
from vergeai.state.ledger import Ledger

log = logging.getLogger("vergeai.server")
TLS_SHUTDOWN_SECONDS = 2.0  # for a TLS client to answer our close before it is cut


def hypercorn_config(opts: ServerConfig) -> Config:
    config = Config()
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    config.bind = [f"{host}:{opts.port}"]
    config.certfile = opts.certfile
    config.keyfile = opts.keyfile
    config.graceful_timeout = opts.grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Hypercorn's idle timer runs from a connection's start (or its last
    # response) until a request's headers are complete, so it is also the
    # deadline for slow headers; read_json bounds the body.
    config.keep_alive_timeout = opts.read_timeout
    config.ssl_handshake_timeout = opts.read_timeout
    return config


def limit_connections(max_connections: int) -> None:
    """Answer connections over the cap with a 503 and close them.

    Hypercorn has no such cap; its asyncio runner builds one ``TCPServer``
    per accepted connection, so we put a counting subclass in its place.
    """
    open_connections = 0

    class CappedTCPServer(hypercorn.asyncio.tcp_server.TCPServer):  # type: ignore[misc]
        counted = False

        async def run(self) -> None:
            nonlocal open_connections
            if open_connections >= max_connections:
                await refuse(self.reader, self.writer)
                return
            open_connections += 1
            self.counted = True
            try:
                await super().run()
            finally:
                self.uncount()

        async def _read_data(self) -> None:
            # run() lingers until the keep-alive timer ends even after the
            # client has gone; the connection stops counting when reading ends
            try:
                await super()._read_data()
            finally:
                self.uncount()

        def uncount(self) -> None:
            nonlocal open_connections
            if self.counted:
                self.counted = False
                open_connections -= 1

    hypercorn.asyncio.run.TCPServer = CappedTCPServer  # type: ignore[attr-defined]


async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = json.dumps(
        error_body(Unavailable("too many open connections; try again shortly", retry_after=1))
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"retry-after: 1\r\nx-request-id: {uuid.uuid4().hex}\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    with contextlib.suppress(Exception):
        # read what the client already sent, so that closing does not reset the answer
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.5)
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def seed_quotas(service: Service) -> None:
    """Today's and this month's tokens from the usage record: quotas survive a restart."""
    ledger = Ledger(service.store.root)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        month = await asyncio.to_thread(ledger.tokens_since, today.replace(day=1))
        day = await asyncio.to_thread(ledger.tokens_since, today)
    except Exception as exc:  # quotas start from zero rather than the server not at all
        log.error("could not read the usage record; token quotas start from zero: %s", exc)
        return
    service.limits.seed(day, month)


def shorten_tls_shutdown(loop: asyncio.AbstractEventLoop) -> None:
    """Close a TLS connection within a few seconds when the client does not answer.

    asyncio waits 30 s for the client's close_notify by default, and
    Hypercorn sets no shorter time, so one idle keep-alive HTTPS client kept
    the server from exiting on SIGTERM for that long.
    """
    create_server = loop.create_server

    async def create_tls_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_shutdown_timeout", TLS_SHUTDOWN_SECONDS)
        return await create_server(*args, **kwargs)

    loop.create_server = create_tls_server  # type: ignore[method-assign]


EXIT_MARGIN = 5.0  # seconds past the grace for the last flushes, before the exit is forced


class Deadline:
    """The grace a stop signal gives: requests drain and workers stop within it.

    A worker stuck in one step (or a thread stuck in native code) would keep
    the process alive past it, so a watchdog ends the process a few seconds
    after the grace, whatever is still running.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.at: float | None = None

    def start(self) -> None:
        if self.at is not None:
            return
        self.at = time.monotonic() + self.grace
        watchdog = threading.Timer(self.grace + EXIT_MARGIN, _forced_exit)
        watchdog.daemon = True
        watchdog.start()

    def left(self) -> float:
        """Seconds of the grace that are left (all of it before a signal)."""
        if self.at is None:
            return self.grace
        return max(0.5, self.at - time.monotonic())


def _forced_exit() -> None:
    log.error("still stopping past the grace: a model step or a request is stuck; exiting now")
    logging.shutdown()
    os._exit(1)


HOUSEKEEPING_SECONDS = 3600.0


async def housekeeping(service: Service, usage_days: int) -> None:
    try:
        await asyncio.to_thread(service.prune_stores, usage_days)
    except Exception as exc:  # what cannot be pruned now is pruned next time
        log.warning("could not prune the stores: %s", exc)


async def every(seconds: float, job: Callable[..., Awaitable[None]], *args: Any) -> None:
    while True:
        await asyncio.sleep(seconds)
        await job(*args)


def migrate(service: Service) -> None:
    """A state dir from before model records is written in the new form at start."""
    try:
        if service.store.migrate():
            log.info("the state dir's assistants now name model records (vergeai model list)")
    except StateError as exc:  # refresh reports it, and keeps serving what it can
        log.error("could not migrate the state dir: %s", exc)


def listen_url(opts: ServerConfig) -> str:
    scheme = "https" if opts.certfile else "http"
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"{scheme}://{host}:{opts.port}"


async def run(service: Service, opts: ServerConfig) -> None:
    config = hypercorn_config(opts)
    # bound first: a port in use is one line (OSError) before anything starts or loads
    sockets = config.create_sockets()
    init_backend(opts.log_level == "debug")
    state_dir = service.store.root
    service.store.ensure()
    admin = await start_admin_server(service, state_dir, [listen_url(opts)])
    migrate(service)
    service.pool.configure(
        opts.load_timeout, opts.memory_budget, opts.memory_wait, opts.saved_prefix_mb
    )
    service.refresh(force=True)
    await housekeeping(service, opts.usage_days)
    await seed_quotas(service)
    app = create_app(
        service,
        metrics_public=opts.metrics_public,
        read_timeout=opts.read_timeout,
        cache_scope=opts.cache_scope,
        store_mb_per_user=opts.store_mb_per_user,
    )
    limit_connections(opts.max_connections)
    stop = asyncio.Event()
    deadline = Deadline(opts.grace_seconds)
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        deadline.start()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    loop.add_signal_handler(signal.SIGHUP, lambda: service.refresh(force=True))
    shorten_tls_shutdown(loop)
    watcher = asyncio.ensure_future(service.watch())
    housekeeper = asyncio.ensure_future(
        every(HOUSEKEEPING_SECONDS, housekeeping, service, opts.usage_days)
    )
    log.info("vergeai listening on %s/v1", listen_url(opts))
    try:
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=sockets,
            shutdown_trigger=stop.wait,
        )
    finally:
        log.info("stopping: in-flight requests have finished or timed out")
        housekeeper.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if admin is not None:
            admin.close()
        remove_socket(state_dir)
        await asyncio.to_thread(service.pool.close, deadline.left())
        service.flush_usage()
        service.flush_records()
        log.info("vergeai stopped")
