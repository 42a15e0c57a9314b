"""One generation from submit to release: the part of the request path every endpoint shares.

A start path (:mod:`vergeai.api.local`, :mod:`vergeai.api.remote`)
prepares the prompt and submits the jobs; the :class:`Generation` it
returns owns the jobs, the chat-history session lease, the reasoning/answer
split and the history write. Endpoints read its typed events inside
``async with generation``; leaving the block cancels the job and releases
the lease, exactly once, whatever happened (the end, an error, a client
gone).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vergeai.api.conversation import Fitted, Lease, Sessions
from vergeai.api.outputs import Answer, Choice, Done, GenerationFailed, Piece, failure
from vergeai.limits import Ticket
from vergeai.runtime.engine import Engine
from vergeai.runtime.job import Delta, Failed, Finished, FinishReason, Job, Task
from vergeai.state.assistants import Assistant

log = logging.getLogger("vergeai.generation")


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
        jobs: Sequence[Task],
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
        self._every_job = [job for leader in jobs for job in leader.group()]
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
