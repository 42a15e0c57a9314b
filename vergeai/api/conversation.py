"""What a chat request becomes before generation: stored history, system prompt, thinking.

Calls in one chat-history session are serialized by a per-session lock held
from reading the history until the answer is stored, so no turn is lost or
interleaved.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vergeai.api.prompting import Rendered, render
from vergeai.runtime.engine import ModelFacts
from vergeai.runtime.prefix import common_prefix
from vergeai.runtime.prompt import Message, with_system_prompt
from vergeai.state.assistants import Assistant
from vergeai.state.history import PER_USER, History, SessionKey, Turn

T = TypeVar("T")


@dataclass
class Fitted:
    """How much history a prompt holds, and its own messages' sizes for the history."""

    turns_used: int
    turns_dropped: int
    message_tokens: list[int]  # of the request's own messages, when they are remembered


@dataclass
class Prepared(Fitted):
    rendered: Rendered
    public: int = 0  # its first tokens any caller's prompt has too: the system prompt's


def _with_history(
    system_prompt: str, history: list[Message], messages: list[Message]
) -> list[Message]:
    """The client's leading system messages stay first, before the history."""
    lead = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return with_system_prompt(system_prompt, messages[:lead] + history + messages[lead:])


def _fit(
    system_prompt: str,
    turns: list[Turn],
    messages: list[Message],
    n_ctx: int,
    max_tokens: int,
    measure: Callable[[list[Message]], tuple[T, int]],
) -> tuple[T, int, int]:
    """Drop the oldest whole turns until the prompt fits the context.

    ``measure`` makes a prompt's form for the model and counts its tokens;
    returns that form, its tokens and how many turns were dropped. The
    system prompt and the request's own messages always stay; room for some
    of the answer (up to a quarter of the context) is kept when history is
    what makes the prompt long.
    """
    reserve = min(max_tokens, n_ctx // 4)
    dropped = 0
    while True:
        history = [m for turn in turns[dropped:] for m in turn]
        measured, size = measure(_with_history(system_prompt, history, messages))
        if dropped == len(turns) or size + reserve < n_ctx:
            return measured, size, dropped
        dropped += 1


def prepare(
    facts: ModelFacts,
    system_prompt: str,
    turns: list[Turn],
    messages: list[Message],
    enable_thinking: bool | None,
    max_tokens: int,
    remember: bool,
    tools: list[dict[str, Any]] | None = None,
    continue_final: bool = False,
) -> Prepared:
    """Render the prompt with as much of the history as fits the context
    (``continue_final``: the final assistant message is continued)."""

    def measure(prompt: list[Message]) -> tuple[Rendered, int]:
        rendered = render(facts, prompt, enable_thinking, tools, continue_final)
        return rendered, len(rendered.tokens)

    rendered, _, dropped = _fit(system_prompt, turns, messages, facts.n_ctx, max_tokens, measure)
    counts = [len(facts.model.tokenize(m["content"])) for m in messages] if remember else []
    public = public_prefix(facts, rendered, system_prompt)
    return Prepared(len(turns) - dropped, dropped, counts, rendered, public)


def public_prefix(facts: ModelFacts, rendered: Rendered, system_prompt: str) -> int:
    """The prompt's tokens up to the end of the assistant's system prompt: what every
    caller of the assistant sends alike, and so may share in the prefix cache."""
    at = rendered.text.find(system_prompt) if system_prompt else -1
    if at < 0:
        return 0
    head = facts.model.tokenize(rendered.text[: at + len(system_prompt)])
    return common_prefix(head, rendered.tokens)


def estimated_tokens(message: Message) -> int:
    """A message's tokens, guessed where no tokenizer is at hand: 4 characters a token."""
    calls = json.dumps(message["tool_calls"]) if message.get("tool_calls") else ""
    return (len(message["content"]) + len(calls)) // 4 + 4


def fit_remote(
    system_prompt: str,
    turns: list[Turn],
    messages: list[Message],
    n_ctx: int,
    max_tokens: int,
    remember: bool,
) -> tuple[list[Message], int, Fitted]:
    """:func:`prepare` for an upstream server: the messages it gets, their estimated
    tokens, and what history they hold."""

    def estimate(prompt: list[Message]) -> tuple[list[Message], int]:
        return prompt, sum(estimated_tokens(m) for m in prompt)

    prompt, size, dropped = _fit(system_prompt, turns, messages, n_ctx, max_tokens, estimate)
    counts = [estimated_tokens(m) for m in messages] if remember else []
    return prompt, size, Fitted(len(turns) - dropped, dropped, counts)


class Lease:
    def __init__(self, sessions: Sessions, key: SessionKey) -> None:
        self.sessions = sessions
        self.key = key
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.sessions._release(self.key)


class Sessions:
    def __init__(self, root: Path, per_user: int = PER_USER) -> None:
        self.history = History(root, per_user)
        self._locks: dict[SessionKey, tuple[asyncio.Lock, int]] = {}

    async def open(
        self, assistant: Assistant, user: str, session_id: str | None
    ) -> tuple[Lease | None, list[Turn]]:
        """The session's lease and stored turns, when the assistant keeps history; else none."""
        if session_id is None or not assistant.chat_history:
            return None, []
        lease = await self.lease(SessionKey(user, assistant.name, session_id))
        try:
            turns = await asyncio.to_thread(self.history.turns, lease.key, assistant.history_days)
        except BaseException:
            lease.release()
            raise
        return lease, turns

    async def lease(self, key: SessionKey) -> Lease:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key)
            raise
        return Lease(self, key)

    def _release(self, key: SessionKey) -> None:
        self._locks[key][0].release()
        self._forget(key)

    def _forget(self, key: SessionKey) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)
