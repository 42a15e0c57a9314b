"""A generation on a model loaded here: the prompt rendered and checked, its choices submitted."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vergeai.api.conversation import Sessions, prepare
from vergeai.api.defaults import max_tokens_for, sampling_for
from vergeai.api.engines import Local
from vergeai.api.fields import Sampled
from vergeai.api.generation import Generation, Memory, Rollout
from vergeai.api.outputs import Answer
from vergeai.api.policy import grammar_of, thinking_for
from vergeai.api.prompting import check_prompt, check_request
from vergeai.api.schemas import ChatRequest
from vergeai.limits import Gate
from vergeai.runtime.constraint import Grammar
from vergeai.runtime.job import Event, Generate, Job
from vergeai.runtime.toolcalls import ToolCallParser


@dataclass(frozen=True)
class Launch:
    """What a local request submits: n choices of each prompt, and how to read each one."""

    req: Sampled
    prompts: list[list[int]]
    max_tokens: int
    answer: Callable[[], Answer]  # a fresh reader for each choice
    grammar: Grammar | None = None
    memory: Memory | None = None  # the chat-history session the answer goes to
    legacy_calls: bool = False  # tool calls are reported as function_call
    public: int = 0  # the prompts' first tokens any caller may share in the prefix cache


async def start_local(
    local: Local, sessions: Sessions, gate: Gate, req: ChatRequest, session_id: str | None
) -> Generation:
    """Prepare the prompt and submit the job; the caller enters the Generation."""
    assistant = local.assistant
    template = local.facts.template
    assert template is not None  # a chat model's facts carry its template
    fmt = template.tool_format
    tools = req.tools
    grammar = await check_request(local.facts, req, grammar_of(req, tools, fmt))
    max_tokens = max_tokens_for(req, assistant)
    lease, turns = await sessions.open(assistant, gate.caller.user.name, session_id)
    try:
        prepared = await asyncio.to_thread(
            prepare,
            local.facts,
            assistant.system_prompt,
            turns,
            req.messages,
            thinking_for(req, assistant),
            max_tokens,
            lease is not None,
            tools.tools if tools else None,
            req.continue_final,
        )
        check_prompt(local.facts, prepared.rendered.tokens)

        def answer() -> Answer:
            calls = ToolCallParser(fmt.syntax, fmt.new_id, tools.parallel) if tools else None
            opens_think = prepared.rendered.opens_think
            return Answer(req.raw_reasoning, opens_think, req.top_logprobs is not None, calls)

        plan = Launch(
            req,
            [prepared.rendered.tokens],
            max_tokens,
            answer,
            grammar,
            memory=Memory(sessions, lease, prepared, req.messages) if lease else None,
            legacy_calls=bool(tools and tools.legacy),
            public=prepared.public,
        )
        return launch(local, gate, plan)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def launch(local: Local, gate: Gate, plan: Launch) -> Generation:
    """Submit n choices of each prompt (choice p*n + j is prompt p's j-th); its Generation.

    Choices are submitted in groups of at most the engine's share of slots,
    each group's choices sharing one evaluation of its prompt (see
    :class:`Rollout`); every choice counts against max_concurrent. The
    caller's limits are checked with the prompts' tokens first and the
    request admitted once submitted, with nothing awaited in between. On any
    failure to submit, what was submitted is cancelled (the lease, if any, is
    the caller's to release).
    """
    n = plan.req.n
    prompt_tokens = sum(len(tokens) for tokens in plan.prompts)
    places = len(plan.prompts) * n  # every answer counts against max_concurrent
    gate.check(prompt_tokens, places)
    engine = local.engine
    leaders = _leaders(local, gate, plan)
    answers = [plan.answer() for _ in range(places)]
    rollout = Rollout(engine, deque(leaders), engine.share)
    try:
        rollout.submit()
        ticket = gate.admit(prompt_tokens, places, reserve=plan.max_tokens * places)
    except BaseException:
        for leader in leaders:
            leader.cancel()
        raise
    heads = tuple(p * n for p in range(len(plan.prompts)))
    return Generation(
        local.assistant, answers, leaders, plan.memory, ticket, plan.legacy_calls, rollout, heads
    )


def _leaders(local: Local, gate: Gate, plan: Launch) -> list[Job]:
    """Every choice's job, on one queue, grouped: each leader with the followers that
    share its prompt, at most the engine's share in a group."""
    req = plan.req
    salt = "" if req.cache_salt is None else f"\x00salt\x00{req.cache_salt}"
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    share = local.engine.share
    leaders = []
    for p, tokens in enumerate(plan.prompts):
        jobs = [
            Job(
                tokens=tokens,
                loop=loop,
                generate=Generate(
                    sampling_for(req, local.assistant, p * req.n + j, plan.grammar),
                    plan.max_tokens,
                    req.stop,
                    req.top_logprobs,
                ),
                choice=p * req.n + j,
                queue=queue,
                scope=gate.scope + salt,
                public=plan.public,
            )
            for j in range(req.n)
        ]
        for g in range(0, req.n, share):
            jobs[g].followers = jobs[g + 1 : g + share]
            leaders.append(jobs[g])
    return leaders
