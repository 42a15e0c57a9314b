"""A streamed request that waits (its model loading, room in the memory budget, a slot,
its prompt's evaluation) gets its event stream at once, with SSE comment lines, so that
proxies and clients do not time out before the first token.

A request that is answered within :data:`GRACE` seconds, or that does not
stream, is answered as its handler answers. Past that, the stream starts
(200, ``text/event-stream``) and carries ``: waiting`` comment lines every
:data:`BEAT` seconds until the handler's answer is ready; then the answer's
own events follow, or an error answer becomes the API's error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from vergeai.api.guard import Handler
from vergeai.api.http import error_response, race_disconnect, sse
from vergeai.api.record import record_of
from vergeai.errors import VergeError

log = logging.getLogger("vergeai.api")

GRACE = 1.0  # seconds a streamed request's answer may take before its stream starts
BEAT = 5.0  # seconds between comment lines
COMMENT = b": waiting\n\n"

# an error answer's JSON as the API's error event
ErrorEvent = Callable[[dict[str, Any]], bytes]


def openai_error_event(body: dict[str, Any]) -> bytes:
    return sse(body)


def responses_error_event(body: dict[str, Any]) -> bytes:
    error = body.get("error") or {}
    payload = json.dumps({"type": "error", "sequence_number": 1, **error})
    return f"event: error\ndata: {payload}\n\n".encode()


def anthropic_error_event(body: dict[str, Any]) -> bytes:
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()


def streams_while_waiting(
    handler: Handler,
    error_event: ErrorEvent = openai_error_event,
    render: Callable[[VergeError], Response] = error_response,
) -> Handler:
    """``handler``, whose streamed answers start within GRACE seconds."""

    @wraps(handler)
    async def waiting(request: Request) -> Response:
        task = asyncio.ensure_future(handler(request))
        done, _ = await asyncio.wait({task}, timeout=GRACE)
        if done or not record_of(request).streaming:
            return await task
        return _Waiting(task, error_event, render)

    return waiting


class _Waiting(Response):
    def __init__(
        self, task: asyncio.Future[Response], error_event: ErrorEvent, render: Callable[..., Any]
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.task = task
        self.error_event = error_event
        self.to_response = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        beating = await race_disconnect(self._beat(send), _disconnected(receive))
        if beating.cancelled() or beating.exception() is not None:  # the client left
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            return
        answer = await self._answer()
        if isinstance(answer, StreamingResponse):

            async def body_only(message: Message) -> None:
                if message["type"] != "http.response.start":
                    await send(message)

            await answer(scope, receive, body_only)
            return
        await send({"type": "http.response.body", "body": self._error_event(answer)})

    async def _beat(self, send: Send) -> None:
        while True:
            await send({"type": "http.response.body", "body": COMMENT, "more_body": True})
            done, _ = await asyncio.wait({self.task}, timeout=BEAT)
            if done:
                return

    async def _answer(self) -> Response:
        try:
            return self.task.result()
        except VergeError as err:
            answer: Response = self.to_response(err)
        except Exception:
            log.exception("a streamed request failed before its first event")
            answer = Response(status_code=500)
        return answer

    def _error_event(self, answer: Response) -> bytes:
        """An answer that is not a stream (an error, or a client gone: 499) as an event."""
        try:
            body = json.loads(bytes(answer.body))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = f"the request ended with status {answer.status_code}"
            body = {"error": {"message": message, "type": "api_error", "code": None}}
        return self.error_event(body)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
