"""POST /v1/chat/completions: parse → authorize → start → ``async with generation`` → reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api import dispatch
from vergeai.api.engines import online_engine
from vergeai.api.generation import Generation
from vergeai.api.http import (
    EventStream,
    gate,
    read_json,
    sse,
    unless_disconnected,
)
from vergeai.api.outputs import Piece
from vergeai.api.reading import account, read_whole
from vergeai.api.record import caller_of
from vergeai.api.replies import Reply
from vergeai.api.schemas import ChatRequest, parse_chat_request
from vergeai.auth import check_assistant
from vergeai.errors import InvalidRequest, VergeError, error_body
from vergeai.service import Service
from vergeai.state.history import SESSION_ID_RE

SESSION_HEADER = "x-session-id"


def session_id_of(request: Request, req: ChatRequest) -> str | None:
    header = request.headers.get(SESSION_HEADER)
    if header is not None and not SESSION_ID_RE.match(header):
        raise InvalidRequest(
            "'X-Session-ID': must be 1-128 characters: letters, digits and . _ : @ -",
            param="session_id",
        )
    if header is not None and req.session_id is not None and header != req.session_id:
        raise InvalidRequest(
            "the X-Session-ID header and the 'session_id' field name different sessions",
            param="session_id",
        )
    return header if header is not None else req.session_id


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    caller = caller_of(request)
    req = parse_chat_request(await read_json(request))
    session_id = session_id_of(request, req)
    check_assistant(caller, req.model, service.state)
    passage = gate(request, caller)
    online = await online_engine(service, req.model, keep_alive=req.keep_alive)
    gen = await dispatch.start(online, request.app.state.sessions, passage, req, session_id)
    reply = Reply(online.assistant.name, req.stream, bool(req.tools and req.tools.legacy))
    headers = {"X-Session-ID": session_id} if session_id else {}
    if req.stream:
        return await stream_reply(request, gen, reply, req.include_usage, headers)
    done = await read_whole(request, gen)
    if done is None:
        return Response(status_code=499)  # nobody reads this answer
    body = reply.whole(done)
    if done.session is not None:
        body["session"] = done.session
    return JSONResponse(body, headers=headers)


async def stream_reply(
    request: Request, gen: Generation, reply: Reply, include_usage: bool, headers: dict[str, str]
) -> Response:
    """Errors before the first token are plain HTTP errors; then a 200 event stream.

    The event stream's own disconnect watcher cancels the body, and leaving
    ``async with gen`` (or the stream's close) stops the job.
    """
    events = await unless_disconnected(request, gen.started())
    if events is None:  # it left before the first token: its place is free at once
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        async with gen:
            for index in range(len(gen.answers)):
                yield sse(reply.chunk({"role": "assistant", "content": None}, index=index))
            finished: set[int] = set()  # choices whose finish chunk went out
            try:
                async for event in events:
                    if isinstance(event, Piece):
                        if replace(event, finish_reason=None):  # it has output
                            delta = reply.delta(event)
                            yield sse(
                                reply.chunk(delta, logprobs=event.logprobs, index=event.index)
                            )
                        if event.finish_reason is not None:
                            finished.add(event.index)
                            yield sse(reply.chunk({}, event.finish_reason, index=event.index))
                        continue
                    account(request, event)
                    final = next(c for c in event.choices if c.index not in finished)
                    last = reply.chunk({}, final.finish_reason, index=final.index)
                    if include_usage:
                        yield sse(last)
                        last = reply.usage_chunk(event)
                    extra = {"session": event.session} if event.session is not None else {}
                    yield sse({**last, "timings": event.timings.to_json(), **extra})
                    yield sse("[DONE]")
            except VergeError as err:
                yield sse(error_body(err))

    return EventStream(body(), headers=headers, on_close=gen.close)
