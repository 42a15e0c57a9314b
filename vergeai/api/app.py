"""create_app: the Starlette application, with no module-level state."""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import disable_created_metrics
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vergeai.api.chat import chat_completions
from vergeai.api.conversation import Sessions
from vergeai.api.http import error_response
from vergeai.api.metrics import Metrics, metrics
from vergeai.api.models import get_model, list_models
from vergeai.api.ops import health
from vergeai.errors import InvalidRequest, NotFound, VergeError
from vergeai.service import Counters, Service

access_log = logging.getLogger("vergeai.access")
log = logging.getLogger("vergeai.app")


async def on_verge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VergeError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: VergeError = NotFound(f"Not Found: {request.method} {request.url.path}")
    else:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return error_response(err)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    err = VergeError("internal error; see the server log")
    return error_response(err)


class AccessLog:
    """One log line and one metrics observation per request; never the token."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        counters: Counters = scope["app"].state.service.counters
        counters.in_flight += 1

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            counters.in_flight -= 1
            counters.requests += 1
            if status >= 500:
                counters.errors += 1
            info: dict[str, Any] = scope.get("state", {})
            assistant = str(info.get("assistant", "-"))
            usage = info.get("usage") or {}
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "assistant": assistant,
                "user": info.get("user", "-"),
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "duration_ms": round(seconds * 1000.0, 1),
            }
            access_log.info(
                "%(method)s %(path)s %(status)d assistant=%(assistant)s user=%(user)s "
                "prompt_tokens=%(prompt_tokens)s completion_tokens=%(completion_tokens)s "
                "%(duration_ms).1fms",
                fields,
                extra={"fields": fields},
            )
            if scope["path"].startswith("/v1/"):
                self.metrics.observe(assistant, status, seconds, usage, info.get("ttft"))


def create_app(service: Service, metrics_public: bool = False) -> Starlette:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    stats = Metrics(service)
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog, metrics=stats)],
        exception_handlers={
            VergeError: on_verge_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.service = service
    app.state.sessions = Sessions(service.store.root)
    app.state.metrics = stats
    app.state.metrics_public = metrics_public
    return app
