"""HTTP plumbing shared by the routes: bounded JSON bodies, errors, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from vergeai.api.record import record_of
from vergeai.auth import Caller
from vergeai.errors import (
    BodyTooLarge,
    InvalidRequest,
    RequestTimeout,
    VergeError,
    error_body,
)
from vergeai.limits import Gate
from vergeai.service import Service

T = TypeVar("T")
MAX_BODY = 1024 * 1024
MAX_DEPTH = 64


def error_response(err: VergeError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


async def read_json(request: Request, limit: int = MAX_BODY) -> Any:
    """The body as JSON, within the size limit and the app's read timeout."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(request.app.state.read_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
    except ClientDisconnect:
        raise InvalidRequest("the client went away before sending the whole body") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {request.app.state.read_timeout:g} s",
            headers={"Connection": "close"},
        ) from None
    if not body:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    value = parse_json(bytes(body))
    if isinstance(value, dict):
        if isinstance(value.get("model"), str):
            # the log and the usage record name the assistant even if the request is refused
            record_of(request).assistant = value["model"]
        record_of(request).streaming = value.get("stream") is True
    return value


def parse_json(data: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate keys, valid Unicode, bounded depth."""
    try:
        value = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except _Refused as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, integers over 4,300 digits
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    _check_strings(value)
    return value


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _check_strings(value: Any) -> None:
    """Every string and key is valid Unicode (no lone surrogates); depth is bounded."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request body is not valid JSON: a string holds a lone surrogate "
            "(\\ud800-\\udfff escape without its pair)"
        ) from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has gone; for use after the body was read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(work: Awaitable[T], gone: Awaitable[None]) -> asyncio.Future[T]:
    """Run ``work`` while ``gone`` watches the client; whichever ends first stops the other.

    Returns ``work``'s task, done or cancelled (the client left first).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return task


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` while one task watches the client; None if it left first."""
    task = await race_disconnect(work, wait_for_disconnect(request))
    return None if task.cancelled() else task.result()


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects.

    Starlette trusts the server to raise on send after a disconnect for
    ASGI 2.4; we always race the stream against ``http.disconnect`` so a
    gone client cancels its generation at once.
    """

    def __init__(
        self,
        content: Any,
        headers: dict[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.on_close = on_close
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            stream = await race_disconnect(
                self.stream_response(send), self.listen_for_disconnect(receive)
            )
        finally:
            if self.on_close is not None:
                # runs even when the body never started, which skips its own finally
                self.on_close()
        failed = stream.done() and not stream.cancelled() and stream.exception()
        if failed and not isinstance(failed, OSError):
            raise failed


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def gate(request: Request, caller: Caller) -> Gate:
    """The caller's way through its limits, for a request that runs a model.

    Refuses at once (429) a caller already at a limit, before any prompt is
    built; the endpoint admits the request once it knows the prompt's tokens.
    """
    service: Service = request.app.state.service
    # the user as created: a user made later under a deleted one's name is another
    scope = f"{caller.user.name}\x00{caller.user.created.isoformat()}"
    if request.app.state.cache_scope == "key":
        scope += "\x00" + caller.key.hash
    passage = Gate(service.limits, caller, scope=scope)
    passage.check()
    record_of(request).gate = passage  # the access log records what its ticket counted
    return passage
