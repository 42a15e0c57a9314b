"""One generation from submit to release: the part of the request path every endpoint shares.

:func:`start` prepares the prompt (system prompt, chat history, thinking)
and submits the job; the :class:`Generation` it returns owns the job, the
chat-history session lease, the reasoning/answer split and the history
write. Endpoints read its typed events inside ``async with generation``;
leaving the block cancels the job and releases the lease, exactly once,
whatever happened (the end, an error, a client gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from vergeai.api.conversation import Fitted, Lease, Sessions, prepare
from vergeai.api.engines import Local
from vergeai.api.fields import Sampled, grammar_spec
from vergeai.api.prompting import check_prompt, check_request
from vergeai.api.schemas import ChatRequest
from vergeai.api.tools import ToolUse
from vergeai.errors import Unavailable, VergeError
from vergeai.limits import Gate, Ticket
from vergeai.runtime.constraint import Grammar, GrammarSpec
from vergeai.runtime.engine import Engine
from vergeai.runtime.job import Delta, Event, Failed, Finished, FinishReason, Job, Timings
from vergeai.runtime.reasoning import ReasoningSplitter
from vergeai.runtime.sampling import Sampling
from vergeai.runtime.toolcalls import CallDelta, ToolCall, ToolCallParser
from vergeai.runtime.toolformats import ToolFormat
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.generation")

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


def failure(event: Failed) -> VergeError:
    if event.error is not None:
        return event.error
    if event.retry_after is not None:
        return Unavailable(event.message, retry_after=event.retry_after)
    return GenerationFailed(event.message)


@dataclass(frozen=True)
class Piece:
    """New output of one choice: reasoning, content, pieces of tool calls (any may be empty)."""

    reasoning: str
    content: str
    logprobs: list[dict[str, Any]] | None = None  # the new tokens', when asked for
    index: int = 0  # the choice
    calls: tuple[CallDelta, ...] = ()
    finish_reason: str | None = None  # the choice's last piece, unless it is the request's last

    def __bool__(self) -> bool:
        return bool(
            self.reasoning or self.content or self.logprobs or self.calls or self.finish_reason
        )


@dataclass(frozen=True)
class Choice:
    """One finished answer of a request (n of them when it asked for n)."""

    index: int
    finish_reason: str  # stop, length, tool_calls (function_call for legacy functions)
    content: str
    reasoning: str
    logprobs: list[dict[str, Any]] | None  # every generated token's, when asked for
    tool_calls: list[ToolCall]
    stop_word: str | None = None  # the stop string that ended it, if one did

    def message(self) -> dict[str, Any]:
        """The answer as the next request's history would send it back."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.tool_calls
            ]
        return message


@dataclass(frozen=True)
class Done:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # of every choice
    timings: Timings  # of the first choice
    ttft: float  # seconds from submit to the first token
    session: dict[str, Any] | None  # id, turns used and dropped, when history is on

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage, with the prompt tokens the KV cache already held as cached."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.timings.cache_n},
        }


class Answer:
    """The generated text: reasoning split off unless asked raw, then tool calls out of content."""

    def __init__(
        self, raw: bool, opens_think: bool, logprobs: bool, calls: ToolCallParser | None
    ) -> None:
        self.splitter = None if raw else ReasoningSplitter(opens_think)
        self.calls = calls
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[dict[str, Any]] | None = [] if logprobs else None
        self.passed_calls: list[ToolCall] = []

    def feed(self, delta: Delta, index: int) -> Piece:
        reasoning, content = self.splitter.feed(delta.text) if self.splitter else ("", delta.text)
        piece = self._keep(delta.reasoning + reasoning, content, delta.logprobs, index, final=False)
        if not delta.calls:
            return piece
        self._take_calls(delta.calls)
        return replace(piece, calls=piece.calls + delta.calls)

    def _take_calls(self, deltas: tuple[CallDelta, ...]) -> None:
        """Tool calls an upstream server parsed, put together from their deltas."""
        for delta in deltas:
            if delta.index < len(self.passed_calls):
                self.passed_calls[delta.index].arguments += delta.arguments
            else:
                self.passed_calls.append(
                    ToolCall(delta.id or "", delta.name or "", delta.arguments)
                )

    def flush(self, index: int) -> Piece:
        reasoning, content = self.splitter.flush() if self.splitter else ("", "")
        return self._keep(reasoning, content, None, index, final=True)

    def _keep(
        self,
        reasoning: str,
        content: str,
        logprobs: list[dict[str, Any]] | None,
        index: int,
        final: bool,
    ) -> Piece:
        calls: list[CallDelta] = []
        if self.calls is not None:
            content, calls = self.calls.feed(content)
            if final:
                tail, more = self.calls.flush()
                content, calls = content + tail, calls + more
        self.reasoning.append(reasoning)
        self.content.append(content)
        if self.logprobs is not None and logprobs:
            self.logprobs.extend(logprobs)
        return Piece(reasoning, content, logprobs, index, tuple(calls))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.calls.calls if self.calls is not None else self.passed_calls

    @property
    def in_reasoning(self) -> bool:
        return bool(self.splitter and self.splitter.in_reasoning)


@dataclass
class Memory:
    """Where a finished turn goes: the chat-history session the lease holds."""

    sessions: Sessions
    lease: Lease
    prepared: Fitted
    messages: list[dict[str, Any]]

    async def remember(
        self, assistant: Assistant, answer: dict[str, Any], tokens: int
    ) -> dict[str, Any]:
        prepared = self.prepared
        turn = [
            (m, n)
            for m, n in zip(self.messages, prepared.message_tokens, strict=True)
            if m["role"] != "system"
        ]
        turn.append((answer, tokens))
        history = self.sessions.history
        await asyncio.to_thread(history.append, self.lease.key, turn, assistant.history_turns)
        return {
            "id": self.lease.key.session,
            "turns_used": prepared.turns_used,
            "turns_dropped": prepared.turns_dropped,
        }


@dataclass
class Rollout:
    """A request's choices, in groups that hold at most ``room`` slots together.

    A group is a leader and the followers that share its prompt. So that one
    request (n choices, or many prompts) never holds every slot while other
    requests wait, its further groups are submitted as its own choices end.
    """

    engine: Engine
    groups: deque[Job]  # leaders not submitted yet, in order
    room: int  # slots this request may still take

    def submit(self) -> None:
        """Submit the groups that fit now (the first one always does)."""
        while self.groups and self.groups[0].slots_needed <= self.room:
            leader = self.groups.popleft()
            self.engine.submit(leader)
            self.room -= leader.slots_needed

    def ended(self) -> None:
        """A choice ended: its slot is this request's to give to its next group."""
        self.room += 1
        self.submit()


class Generation:
    def __init__(
        self,
        assistant: Assistant,
        answers: list[Answer],
        jobs: list[Job],
        memory: Memory | None,
        ticket: Ticket,
        legacy_calls: bool = False,
        rollout: Rollout | None = None,
        heads: tuple[int, ...] = (0,),
    ) -> None:
        self.assistant = assistant
        self.legacy_calls = legacy_calls  # calls are reported as function_call
        self.answers = answers  # one per choice: n per prompt
        self.jobs = jobs  # the leaders, each with the followers that share its prompt
        self.heads = heads  # each prompt's first choice: its prompt tokens are the request's
        self.queue = jobs[0].queue  # every choice's events
        self.memory = memory
        self.ticket = ticket  # the caller's place under its limits
        self.rollout = rollout  # the groups still to submit, if any
        self._every_job = [job for leader in jobs for job in (leader, *leader.followers)]
        self._closed = False

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the job, release the session and the caller's place; safe to call again."""
        if self._closed:
            return
        self._closed = True
        for job in self.jobs:
            job.cancel()
        if self.memory is not None:
            self.memory.lease.release()
        self._charge()
        self.ticket.release()

    def _charge(self) -> None:
        """Count the tokens generated so far against the caller's limits."""
        self.ticket.charge(sum(job.n_generated for job in self._every_job))

    async def events(self) -> AsyncIterator[Piece | Done]:
        """Pieces of text as they come, then one Done; a failure raises its error."""
        finished: dict[int, Finished] = {}
        while len(finished) < len(self.answers):
            index, event = await self.queue.get()
            answer = self.answers[index]
            if isinstance(event, Delta):
                self._charge()
                piece = answer.feed(event, index)
                if piece:
                    yield piece
            elif isinstance(event, Failed):
                raise failure(event)
            elif isinstance(event, Finished):
                piece = answer.flush(index)
                finished[index] = event
                self.ticket.settle_prompt(event.prompt_tokens)
                if self.rollout is not None:
                    self.rollout.ended()
                if len(finished) < len(self.answers):  # the last one's comes with Done
                    reason = self._finish_reason(event.finish_reason, answer)
                    piece = replace(piece, finish_reason=reason)
                if piece:
                    yield piece
                if event.finish_reason == "length" and answer.in_reasoning:
                    self._warn_thinking_cut(event.completion_tokens)
        choices = [
            Choice(
                index=i,
                finish_reason=self._finish_reason(finished[i].finish_reason, answer),
                content="".join(answer.content),
                reasoning="".join(answer.reasoning),
                logprobs=answer.logprobs,
                tool_calls=answer.tool_calls,
                stop_word=finished[i].stop_word,
            )
            for i, answer in enumerate(self.answers)
        ]
        first = finished[0]
        session = None
        if self.memory is not None:
            session = await self.memory.remember(
                self.assistant, choices[0].message(), first.completion_tokens
            )
        yield Done(
            choices=choices,
            prompt_tokens=sum(finished[i].prompt_tokens for i in self.heads),
            completion_tokens=sum(f.completion_tokens for f in finished.values()),
            timings=first.timings,
            ttft=self.jobs[0].t_first - self.jobs[0].t_created,
            session=session,
        )

    def _finish_reason(self, reason: FinishReason, answer: Answer) -> str:
        if reason == "stop" and answer.tool_calls:
            return "function_call" if self.legacy_calls else "tool_calls"
        return reason

    def _warn_thinking_cut(self, tokens: int) -> None:
        name = self.assistant.name
        log.warning(
            "assistant %s ran out of tokens while thinking (%d tokens, no answer yet); use "
            "'vergeai assistant edit %s --disable-think' or a larger max_tokens",
            name,
            tokens,
            name,
        )

    async def started(self) -> AsyncIterator[Piece | Done]:
        """The events, the first one awaited now: a stream sends its 200 only after it.

        So a failure before the first token (a full queue, a prompt too long)
        raises here and is answered as a plain HTTP error; the job is closed.
        """
        events = self.events()
        try:
            first = await anext(events)
        except BaseException:
            self.close()
            raise

        async def all_events() -> AsyncIterator[Piece | Done]:
            yield first
            async for event in events:
                yield event

        return all_events()

    async def whole(self) -> Done:
        """Read to the end; the finished answer."""
        async for event in self.events():
            if isinstance(event, Done):
                return event
        raise GenerationFailed("the generation ended without an answer")


def sampling_for(
    req: Sampled, assistant: Assistant, choice: int = 0, grammar: Grammar | None = None
) -> Sampling:
    """The request's sampling over the assistant's defaults; choice i of n seeds with seed+i."""

    def pick(value: float | None, default: float | None, fallback: float) -> float:
        return value if value is not None else default if default is not None else fallback

    return Sampling(
        temperature=pick(req.temperature, assistant.temperature, DEFAULT_TEMPERATURE),
        top_p=pick(req.top_p, assistant.top_p, DEFAULT_TOP_P),
        top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
        min_p=DEFAULT_MIN_P if req.min_p is None else req.min_p,
        seed=None if req.seed is None else (req.seed + choice) % 2**32,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
        repeat_last_n=req.repeat_last_n,
        logit_bias=req.logit_bias,
        grammar=grammar,
    )


def grammar_of(req: Sampled, tools: ToolUse | None, fmt: ToolFormat | None) -> GrammarSpec | None:
    """What the output must follow: the tools' calls (or the answer), else the request's own.

    Under tool_choice auto without a response_format, the calls' grammar
    applies from where the model starts one. (A trigger inside a thinking
    model's reasoning would start it there too; llama.cpp's server shares
    that limit.)
    """
    if tools is None or fmt is None:
        return grammar_spec(req)
    return tools.grammar(fmt, req.schema, lazy=not tools.forced and req.schema is None)


def thinking_for(req: ChatRequest, assistant: Assistant) -> bool | None:
    """enable_thinking for the template: the request's, else off if the assistant says so.

    A grammar from the first token on (structured output, forced tool calls)
    leaves no room to think first, so it turns thinking off too.
    """
    if req.schema is not None or (req.tools is not None and req.tools.forced):
        return False
    if req.enable_thinking is None and assistant.disable_think:
        return False
    return req.enable_thinking


async def start_local(
    local: Local,
    sessions: Sessions,
    gate: Gate,
    req: ChatRequest,
    session_id: str | None,
) -> Generation:
    """Prepare the prompt and submit the job; the caller enters the Generation."""
    assistant = local.engine.assistant
    user = gate.caller.user.name
    template = local.facts.template
    assert template is not None  # a chat model's
    fmt = template.tool_format
    tools = req.tools
    grammar = await check_request(local.facts, req, grammar_of(req, tools, fmt))
    max_tokens = req.max_tokens or assistant.max_tokens or DEFAULT_MAX_TOKENS
    thinking = thinking_for(req, assistant)
    lease, turns = await sessions.open(assistant, user, session_id)
    try:
        prepared = await asyncio.to_thread(
            prepare,
            local.facts,
            assistant.system_prompt,
            turns,
            req.messages,
            thinking,
            max_tokens,
            lease is not None,
            tools.tools if tools else None,
            req.continue_final,
        )
        check_prompt(local.facts, prepared.rendered.tokens)
        memory = Memory(sessions, lease, prepared, req.messages) if lease else None

        def answer() -> Answer:
            calls = ToolCallParser(fmt.syntax, fmt.new_id, tools.parallel) if tools else None
            opens_think = prepared.rendered.opens_think
            return Answer(req.raw_reasoning, opens_think, req.top_logprobs is not None, calls)

        legacy = bool(tools and tools.legacy)
        tokens = [prepared.rendered.tokens]
        return launch(
            local.engine, req, tokens, max_tokens, answer, gate, grammar, memory, legacy,
            prepared.public,
        )  # fmt: skip
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def launch(
    engine: Engine,
    req: Sampled,
    prompts: list[list[int]],
    max_tokens: int,
    answer: Callable[[], Answer],
    gate: Gate,
    grammar: Grammar | None = None,
    memory: Memory | None = None,
    legacy_calls: bool = False,
    public: int = 0,
) -> Generation:
    """Submit n choices of each prompt (choice p*n + j is prompt p's j-th); its Generation.

    Choices are submitted in groups of at most the worker's share of slots,
    each group's choices sharing one evaluation of its prompt (see
    :class:`Rollout`); every choice counts against max_concurrent. The
    caller's limits are checked with the prompts' tokens first and the
    request admitted once submitted, with nothing awaited in between. On any
    failure to submit, what was submitted is cancelled (the lease, if any, is
    the caller's to release).
    """
    prompt_tokens = sum(len(tokens) for tokens in prompts)
    places = len(prompts) * req.n  # every answer counts against max_concurrent
    salt = "" if req.cache_salt is None else f"\x00salt\x00{req.cache_salt}"
    scope = gate.scope + salt
    gate.check(prompt_tokens, places)
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    share = engine.share
    leaders = []
    for p, tokens in enumerate(prompts):
        jobs = [
            Job(
                tokens=tokens,
                sampling=sampling_for(req, engine.assistant, p * req.n + j, grammar),
                max_tokens=max_tokens,
                stop=req.stop,
                loop=loop,
                top_logprobs=req.top_logprobs,
                choice=p * req.n + j,
                queue=queue,
                scope=scope,
                public=public,
            )
            for j in range(req.n)
        ]
        for g in range(0, req.n, share):
            jobs[g].followers = jobs[g + 1 : g + share]
            leaders.append(jobs[g])
    answers = [answer() for _ in range(places)]
    rollout = Rollout(engine, deque(leaders), share)
    try:
        rollout.submit()
        ticket = gate.admit(prompt_tokens, places, reserve=max_tokens * places)
    except BaseException:
        for leader in leaders:
            leader.cancel()
        raise
    heads = tuple(p * req.n for p in range(len(prompts)))
    return Generation(
        engine.assistant, answers, leaders, memory, ticket, legacy_calls, rollout, heads
    )
