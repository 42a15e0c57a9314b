"""The access log middleware: per request an x-request-id, its record, one log line, metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vergeai.api.http import error_response
from vergeai.api.metrics import Metrics
from vergeai.api.record import RequestRecord
from vergeai.errors import VergeError
from vergeai.logs import log_token
from vergeai.service import Service
from vergeai.state.ledger import by_day

access_log = logging.getLogger("vergeai.access")
log = logging.getLogger("vergeai.app")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


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
    """Per request: an x-request-id, its :class:`RequestRecord`, one log line and one
    metrics observation.

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
        record = RequestRecord(request_id_of(scope))
        scope.setdefault("state", {})["record"] = record
        service: Service = scope["app"].state.service
        service.counters.in_flight += 1

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = record.request_id
                if record.caller is not None:  # as of now, this request counted
                    headers.update(service.limits.headers(record.caller))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unexpected error on %s %s (request %s)",
                scope["method"],
                log_token(scope["path"]),
                record.request_id,
            )
            if status == 0:
                err = VergeError("internal error; see the server log")
                await error_response(err)(scope, receive, send_with_id)
        finally:
            self.finish(scope, service, record, status or 500, time.perf_counter() - start)

    def finish(
        self, scope: Scope, service: Service, record: RequestRecord, status: int, seconds: float
    ) -> None:
        counters = service.counters
        counters.in_flight -= 1
        counters.requests += 1
        if status >= 500:
            counters.errors += 1
        # metric labels and log fields only ever take configured assistant names
        assistant = record.assistant if record.assistant in service.state.assistants else "-"
        ms = round(seconds * 1000.0, 1)
        if assistant != "-" and record.caller is not None:
            ticket = record.ticket
            row = record.ledger_row(assistant, scope["path"], status, ms)
            for day in by_day(row, ticket.days if ticket is not None else {}):
                service.record(day)
        usage = record.counted()
        self.write(scope, record, assistant, status, usage, ms)
        if scope["path"].startswith("/v1/"):
            self.metrics.observe(assistant, status, seconds, usage, record.ttft)

    @staticmethod
    def write(
        scope: Scope,
        record: RequestRecord,
        assistant: str,
        status: int,
        usage: dict[str, Any],
        ms: float,
    ) -> None:
        """The access log line (and its fields, for JSON logs)."""
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "assistant": assistant,
            "user": record.user,
            "key": record.key,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "duration_ms": ms,
            "request_id": record.request_id,
        }
        refused = ""
        if record.refused is not None:  # why a key was refused, which the client is never told
            fields["refused"] = record.refused
            refused = f" refused={log_token(record.refused)}"
        text = {k: log_token(str(v)) for k, v in fields.items()}
        access_log.info(
            "%(method)s %(path)s %(status)s assistant=%(assistant)s user=%(user)s key=%(key)s "
            "prompt_tokens=%(prompt_tokens)s completion_tokens=%(completion_tokens)s "
            "%(duration_ms)sms request_id=%(request_id)s" + refused,
            text,
            extra={"fields": fields},
        )
