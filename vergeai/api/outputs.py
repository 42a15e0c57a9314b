"""What a generation yields: pieces of output as they come, then the finished answer.

:class:`Answer` turns one choice's token events into :class:`Piece` s
(reasoning split off, tool calls parsed out of the content); the request's
end is one :class:`Done` with every :class:`Choice`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vergeai.errors import Unavailable, VergeError
from vergeai.runtime.job import Delta, Failed, Timings
from vergeai.runtime.reasoning import ReasoningSplitter
from vergeai.runtime.toolcalls import CallDelta, ToolCall, ToolCallParser


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
