"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api.conversation import Prepared, Sessions, prepare
from vergeai.api.http import EventStream, read_json, sse, wait_for_disconnect
from vergeai.api.replies import Reply
from vergeai.api.schemas import ChatRequest, parse_chat_request
from vergeai.auth import Caller, check_assistant
from vergeai.errors import InvalidRequest, Unavailable, VergeError, error_body
from vergeai.runtime.job import Delta, Event, Failed, Finished, Job
from vergeai.runtime.llama import GrammarError, Sampling, check_grammar
from vergeai.runtime.reasoning import ReasoningSplitter
from vergeai.runtime.worker import Worker, WorkerState
from vergeai.service import Service
from vergeai.state.history import SESSION_ID_RE, SessionKey
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.chat")

# llama-server's sampling defaults, used when neither request nor assistant sets one
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_MAX_TOKENS = 2048
SESSION_HEADER = "x-session-id"


class GenerationFailed(VergeError):
    status = 500
    type = "server_error"
    code = "generation_failed"


def failure(event: Failed) -> VergeError:
    if event.retry_after is not None:
        return Unavailable(event.message, retry_after=event.retry_after)
    return GenerationFailed(event.message)


def online_worker(service: Service, name: str) -> Worker:
    worker = service.pool.get(name)
    if worker is None:
        raise Unavailable(
            f"assistant {name!r} is offline; an admin can bring it online with "
            f"'vergeai assistant online {name}'"
        )
    if worker.status == WorkerState.LOADING:
        raise Unavailable(
            f"assistant {name!r} is still loading its model; try again shortly", retry_after=5
        )
    if worker.crashed:
        raise Unavailable(f"assistant {name!r} is restarting; try again shortly", retry_after=2)
    if worker.status != WorkerState.ONLINE:
        raise Unavailable(f"assistant {name!r} failed to load its model: {worker.error}")
    return worker


def sampling_for(req: ChatRequest, assistant: Assistant) -> Sampling:
    def pick(value: float | None, default: float | None, fallback: float) -> float:
        return value if value is not None else default if default is not None else fallback

    return Sampling(
        temperature=pick(req.temperature, assistant.temperature, DEFAULT_TEMPERATURE),
        top_p=pick(req.top_p, assistant.top_p, DEFAULT_TOP_P),
        top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
        min_p=DEFAULT_MIN_P if req.min_p is None else req.min_p,
        seed=None if req.seed is None else req.seed % 2**32,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
        repeat_last_n=req.repeat_last_n,
        logit_bias=req.logit_bias,
        grammar=req.grammar,
    )


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


async def check_request(worker: Worker, req: ChatRequest) -> None:
    assert worker.model is not None
    model = worker.model
    if any(t >= model.n_vocab for t in req.logit_bias):
        raise InvalidRequest(
            f"'logit_bias': token ids must be below the vocabulary size {model.n_vocab}",
            param="logit_bias",
        )
    if req.grammar:
        try:
            await asyncio.to_thread(check_grammar, model, req.grammar)
        except GrammarError as exc:
            raise InvalidRequest(f"'grammar': {exc.message}", param="grammar") from None


@dataclass
class Memory:
    """Stores a completed call's turn into its chat-history session."""

    sessions: Sessions
    key: SessionKey
    assistant: Assistant
    prepared: Prepared
    messages: list[dict[str, str]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.key.session,
            "turns_used": self.prepared.turns_used,
            "turns_dropped": self.prepared.turns_dropped,
        }

    async def remember(self, answer: str, done: Finished) -> None:
        turn = [
            (m, n)
            for m, n in zip(self.messages, self.prepared.message_tokens, strict=True)
            if m["role"] != "system"
        ]
        turn.append(({"role": "assistant", "content": answer}, done.completion_tokens))
        await asyncio.to_thread(
            self.sessions.history.append, self.key, turn, self.assistant.history_turns
        )


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    caller: Caller = service.authenticate(request.headers.get("authorization"))
    request.state.user = caller.user.name
    req = parse_chat_request(await read_json(request))
    request.state.assistant = req.model
    session_id = session_id_of(request, req)
    check_assistant(caller, req.model, service.state)
    worker = online_worker(service, req.model)
    assistant = worker.assistant
    await check_request(worker, req)
    max_tokens = req.max_tokens or assistant.max_tokens or DEFAULT_MAX_TOKENS
    thinking = req.enable_thinking
    if thinking is None and assistant.disable_think:
        thinking = False

    sessions: Sessions = request.app.state.sessions
    key = SessionKey(caller.user.name, assistant.name, session_id) if session_id else None
    lease = await sessions.lease(key) if key and assistant.chat_history else None
    try:
        turns = []
        if lease is not None:
            turns = await asyncio.to_thread(
                sessions.history.turns, lease.key, assistant.history_days
            )
        prepared = await asyncio.to_thread(
            prepare,
            worker,
            assistant.system_prompt,
            turns,
            req.messages,
            thinking,
            max_tokens,
            lease is not None,
        )
        worker.check_prompt(prepared.rendered.tokens)
        job = Job(
            tokens=prepared.rendered.tokens,
            sampling=sampling_for(req, assistant),
            max_tokens=max_tokens,
            stop=req.stop,
            loop=asyncio.get_running_loop(),
        )
        worker.submit(job)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    memory = None
    if lease is not None and key is not None:
        memory = Memory(sessions, key, assistant, prepared, req.messages)
    answer = Answer(assistant.name, req.raw_reasoning, prepared.rendered.opens_think)
    reply = Reply(name=assistant.name, stream=req.stream)
    headers = {"X-Session-ID": session_id} if session_id else {}

    async def finished(done: Finished) -> dict[str, Any]:
        """Bookkeeping once the answer is complete; returns extra response fields."""
        request.state.usage = Reply.usage(done)
        request.state.ttft = job.t_first - job.t_created
        answer.check_budget(done)
        if memory is None:
            return {}
        await memory.remember(answer.text(), done)
        return {"session": memory.info()}

    def close() -> None:
        job.cancel()
        if lease is not None:
            lease.release()

    if req.stream:
        return await stream_reply(job, reply, answer, req.include_usage, finished, headers, close)
    try:
        return await whole_reply(request, job, reply, answer, finished, headers)
    finally:
        close()


class Answer:
    """The generated text, split into reasoning and content unless asked raw."""

    def __init__(self, assistant: str, raw: bool, opens_think: bool) -> None:
        self.assistant = assistant
        self.splitter = None if raw else ReasoningSplitter(opens_think)
        self.content: list[str] = []
        self.reasoning: list[str] = []

    def feed(self, text: str) -> tuple[str, str]:
        return self._keep(*(self.splitter.feed(text) if self.splitter else ("", text)))

    def flush(self) -> tuple[str, str]:
        return self._keep(*(self.splitter.flush() if self.splitter else ("", "")))

    def _keep(self, reasoning: str, content: str) -> tuple[str, str]:
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content

    def text(self) -> str:
        return "".join(self.content)

    def check_budget(self, done: Finished) -> None:
        if done.finish_reason == "length" and self.splitter and self.splitter.in_reasoning:
            log.warning(
                "assistant %s ran out of tokens while thinking (%d tokens, no answer yet); "
                "use 'vergeai assistant edit %s --disable-think' or a larger max_tokens",
                self.assistant,
                done.completion_tokens,
                self.assistant,
            )


async def whole_reply(
    request: Request,
    job: Job,
    reply: Reply,
    answer: Answer,
    finished: Callable[[Finished], Awaitable[dict[str, Any]]],
    headers: dict[str, str],
) -> Response:
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        async for event in _race(job.events(), gone):
            if isinstance(event, Delta):
                answer.feed(event.text)
            elif isinstance(event, Failed):
                raise failure(event)
            else:
                answer.flush()
                extra = await finished(event)
                body = reply.whole(answer.text(), "".join(answer.reasoning), event)
                return JSONResponse({**body, **extra}, headers=headers)
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


def _delta(reasoning: str, content: str) -> dict[str, str]:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return delta


async def stream_reply(
    job: Job,
    reply: Reply,
    answer: Answer,
    include_usage: bool,
    finished: Callable[[Finished], Awaitable[dict[str, Any]]],
    headers: dict[str, str],
    close: Callable[[], None],
) -> Response:
    """Errors before the first token are plain HTTP errors; then a 200 event stream."""
    events: AsyncIterator[Event] = job.events()
    try:
        first = await anext(events)
        if isinstance(first, Failed):
            raise failure(first)
    except BaseException:
        close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            yield sse(reply.chunk({"role": "assistant", "content": None}))
            event: Event = first
            while True:
                if isinstance(event, Delta):
                    if delta := _delta(*answer.feed(event.text)):
                        yield sse(reply.chunk(delta))
                elif isinstance(event, Failed):
                    yield sse(error_body(failure(event)))
                    return
                else:
                    if delta := _delta(*answer.flush()):
                        yield sse(reply.chunk(delta))
                    extra = await finished(event)
                    last = reply.chunk({}, event.finish_reason)
                    if include_usage:
                        yield sse(last)
                        last = reply.usage_chunk(event)
                    yield sse({**last, "timings": event.timings, **extra})
                    yield sse("[DONE]")
                    return
                event = await anext(events)
        finally:
            close()

    return EventStream(body(), headers=headers, on_close=close)
