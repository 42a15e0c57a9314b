"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api.http import EventStream, read_json, sse, wait_for_disconnect
from vergeai.api.schemas import ChatRequest, parse_chat_request
from vergeai.auth import Caller, check_assistant
from vergeai.errors import InvalidRequest, Unavailable, VergeError
from vergeai.runtime.job import Delta, Event, Failed, Finished, Job
from vergeai.runtime.llama import Sampling
from vergeai.runtime.prompt import with_system_prompt
from vergeai.runtime.worker import Worker
from vergeai.service import Service
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.chat")

# llama-server's sampling defaults, used when neither request nor assistant sets one
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_MAX_TOKENS = 2048


class GenerationFailed(VergeError):
    status = 500
    type = "server_error"
    code = "generation_failed"


def online_worker(service: Service, name: str) -> Worker:
    worker = service.pool.get(name)
    if worker is None:
        raise Unavailable(
            f"assistant {name!r} is offline; an admin can bring it online with "
            f"'vergeai assistant online {name}'"
        )
    if worker.status == "loading":
        raise Unavailable(
            f"assistant {name!r} is still loading its model; try again shortly",
            headers={"Retry-After": "5"},
        )
    if worker.status != "online":
        raise Unavailable(f"assistant {name!r} failed to load its model: {worker.error}")
    return worker


def sampling_for(req: ChatRequest, assistant: Assistant) -> Sampling:
    def pick(value: float | None, default: float | None, fallback: float) -> float:
        return value if value is not None else default if default is not None else fallback

    return Sampling(
        temperature=pick(req.temperature, assistant.temperature, DEFAULT_TEMPERATURE),
        top_p=pick(req.top_p, assistant.top_p, DEFAULT_TOP_P),
        top_k=DEFAULT_TOP_K,
        min_p=DEFAULT_MIN_P,
        seed=None if req.seed is None else req.seed % 2**32,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=req.logit_bias,
    )


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    caller: Caller = service.authenticate(request.headers.get("authorization"))
    request.state.user = caller.user.name
    req = parse_chat_request(await read_json(request))
    request.state.assistant = req.model
    check_assistant(caller, req.model, service.state)
    worker = online_worker(service, req.model)
    assistant = worker.assistant
    assert worker.model is not None
    if any(t >= worker.model.n_vocab for t in req.logit_bias):
        raise InvalidRequest(
            f"'logit_bias': token ids must be below the vocabulary size {worker.model.n_vocab}",
            param="logit_bias",
        )
    messages = with_system_prompt(assistant.system_prompt, req.messages)
    tokens = await asyncio.to_thread(worker.prompt_tokens, messages, None)
    worker.check_prompt(tokens)
    job = Job(
        tokens=tokens,
        sampling=sampling_for(req, assistant),
        max_tokens=req.max_tokens or assistant.max_tokens or DEFAULT_MAX_TOKENS,
        stop=req.stop,
        loop=asyncio.get_running_loop(),
    )
    worker.submit(job)
    reply = Reply(name=assistant.name, stream=req.stream)
    if req.stream:
        return await stream_reply(request, job, reply, req.include_usage)
    return await whole_reply(request, job, reply)


class Reply:
    """Builds the OpenAI response objects of one completion."""

    def __init__(self, name: str, stream: bool) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.name = name
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if stream else "chat.completion"

    def base(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.name,
            "system_fingerprint": self.name,
        }

    @staticmethod
    def usage(done: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    def whole(self, content: str, done: Finished) -> dict[str, Any]:
        return {
            **self.base(),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": self.usage(done),
            "timings": done.timings,
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **self.base(),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }


def note_finished(request: Request, job: Job, done: Finished) -> None:
    """For the access log and metrics."""
    request.state.usage = Reply.usage(done)
    request.state.ttft = job.t_first - job.t_created


async def whole_reply(request: Request, job: Job, reply: Reply) -> Response:
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    parts: list[str] = []
    try:
        async for event in _race(job.events(), gone):
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise GenerationFailed(event.message)
            else:
                note_finished(request, job, event)
                return JSONResponse(reply.whole("".join(parts), event))
    finally:
        job.cancel()
        gone.cancel()
    # the client went away; nobody reads this answer
    return Response(status_code=499)


async def _race(events: AsyncIterator[Any], gone: asyncio.Future[None]) -> AsyncIterator[Any]:
    while True:
        nxt = asyncio.ensure_future(anext(events))
        await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


async def stream_reply(request: Request, job: Job, reply: Reply, include_usage: bool) -> Response:
    events: AsyncIterator[Event] = job.events()
    try:
        first = await anext(events)
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, Failed):
        job.cancel()
        raise GenerationFailed(first.message)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield sse(reply.chunk({"role": "assistant", "content": None}))
            event: Event = first
            while True:
                if isinstance(event, Delta):
                    yield sse(reply.chunk({"content": event.text}))
                elif isinstance(event, Failed):
                    err = GenerationFailed(event.message)
                    yield sse({"error": {"message": err.message, "type": err.type}})
                    return
                else:
                    note_finished(request, job, event)
                    last = reply.chunk({}, event.finish_reason)
                    if include_usage:
                        yield sse(last)
                        last = {**reply.base(), "choices": [], "usage": reply.usage(event)}
                    last["timings"] = event.timings
                    yield sse(last)
                    yield sse("[DONE]")
                    return
                event = await anext(events)
        finally:
            job.cancel()

    return EventStream(body())
