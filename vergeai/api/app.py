"""create_app: the Starlette application, with no module-level state."""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prometheus_client import disable_created_metrics
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vergeai.api import anthropic, responses
from vergeai.api.chat import chat_completions
from vergeai.api.completions import completions
from vergeai.api.conversation import Sessions
from vergeai.api.embeddings import embeddings
from vergeai.api.http import error_response
from vergeai.api.metrics import Metrics, metrics
from vergeai.api.models import get_model, list_models
from vergeai.api.ops import health
from vergeai.errors import InvalidRequest, NotFound, VergeError
from vergeai.logs import log_token
from vergeai.service import Service
from vergeai.state.ledger import Record, by_day
from vergeai.state.responses import Responses

access_log = logging.getLogger("vergeai.access")
log = logging.getLogger("vergeai.app")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


async def on_verge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VergeError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: VergeError = NotFound(f"Not Found: {request.method} {request.url.path[:200]}")
    else:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return error_response(err)


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID when it is a plain token, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if REQUEST_ID_RE.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class AccessLog:
    """Per request: an x-request-id, one log line and one metrics observation.

    It is also where an unexpected exception ends: logged once, answered with
    a 500 in the OpenAI shape if nothing was sent yet, and not re-raised (so
    neither Starlette nor Hypercorn logs it a second time). Never the token.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        service: Service = scope["app"].state.service
        service.counters.in_flight += 1

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                caller = scope["state"].get("caller")
                if caller is not None:  # as of now, this request counted
                    headers.update(service.limits.headers(caller))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unexpected error on %s %s (request %s)",
                scope["method"],
                log_token(scope["path"]),
                request_id,
            )
            if status == 0:
                err = VergeError("internal error; see the server log")
                await error_response(err)(scope, receive, send_with_id)
        finally:
            self.record(scope, service, status or 500, time.perf_counter() - start)

    def record(self, scope: Scope, service: Service, status: int, seconds: float) -> None:
        counters = service.counters
        counters.in_flight -= 1
        counters.requests += 1
        if status >= 500:
            counters.errors += 1
        info: dict[str, Any] = scope.get("state", {})
        named = str(info.get("assistant", "-"))
        # metric labels and log fields only ever take configured assistant names
        assistant = named if named in service.state.assistants else "-"
        usage = info.get("usage") or {}
        ticket = getattr(info.get("gate"), "ticket", None)
        if not usage and ticket is not None:  # cut short: what its limits counted
            usage = {
                "prompt_tokens": ticket.prompt_tokens,
                "completion_tokens": ticket.completion_tokens,
            }
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "assistant": assistant,
            "user": info.get("user", "-"),
            "key": info.get("key", info.get("refused_key", "-")),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "duration_ms": round(seconds * 1000.0, 1),
            "request_id": info["request_id"],
        }
        if assistant != "-" and "user" in info:
            record = Record(
                at=datetime.now(UTC).isoformat(),
                user=info["user"],
                key=info.get("key", "-"),
                assistant=assistant,
                endpoint=scope["path"][:64],
                status=status,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                cached_tokens=int((usage.get("prompt_tokens_details") or {}).get(
                    "cached_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                duration_ms=round(seconds * 1000.0, 1),
                request_id=info["request_id"],
            )  # fmt: skip
            for row in by_day(record, ticket.days if ticket is not None else {}):
                service.record(row)
        refused = ""
        if "refused" in info:  # why a key was refused, which the client is never told
            fields["refused"] = info["refused"]
            refused = f" refused={log_token(info['refused'])}"
        text = {k: log_token(str(v)) for k, v in fields.items()}
        access_log.info(
            "%(method)s %(path)s %(status)s assistant=%(assistant)s user=%(user)s key=%(key)s "
            "prompt_tokens=%(prompt_tokens)s completion_tokens=%(completion_tokens)s "
            "%(duration_ms)sms request_id=%(request_id)s" + refused,
            text,
            extra={"fields": fields},
        )
        if scope["path"].startswith("/v1/"):
            self.metrics.observe(assistant, status, seconds, usage, info.get("ttft"))


def create_app(
    service: Service,
    metrics_public: bool = False,
    read_timeout: float = 30.0,
    cache_scope: str = "user",
    store_mb_per_user: int = 256,
) -> Starlette:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    stats = Metrics(service)
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", anthropic.messages, methods=["POST"]),
        Route("/v1/responses", responses.create_response, methods=["POST"]),
        Route("/v1/responses/{id}", responses.get_response, methods=["GET"]),
        Route("/v1/responses/{id}/input_items", responses.list_input_items, methods=["GET"]),
        Route("/v1/responses/{id}", responses.delete_response, methods=["DELETE"]),
        Route("/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog, metrics=stats)],
        exception_handlers={VergeError: on_verge_error, HTTPException: on_http_error},
    )
    app.state.service = service
    per_user = store_mb_per_user * 1024 * 1024
    app.state.sessions = Sessions(service.store.root, per_user)
    app.state.responses = Responses(service.store.root, per_user)
    app.state.metrics = stats
    app.state.metrics_public = metrics_public
    app.state.read_timeout = read_timeout
    app.state.cache_scope = cache_scope
    return app
