"""OpenAI response objects for one chat completion, whole or as stream chunks."""

from __future__ import annotations

import secrets
import time
from typing import Any

from vergeai.api.outputs import Choice, Done, Piece
from vergeai.runtime.toolcalls import CallDelta


class Reply:
    def __init__(self, name: str, stream: bool, legacy_calls: bool = False) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.name = name
        self.legacy_calls = legacy_calls  # calls as function_call, for legacy functions
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

    def whole(self, done: Done) -> dict[str, Any]:
        return {
            **self.base(),
            "choices": [self._choice(c) for c in done.choices],
            "usage": done.usage(),
            "timings": done.timings.to_json(),
        }

    def _choice(self, choice: Choice) -> dict[str, Any]:
        message = choice.message()
        if choice.tool_calls:
            if not choice.content.strip():
                message["content"] = None
            if self.legacy_calls:
                message["function_call"] = message.pop("tool_calls")[0]["function"]
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning
        return {
            "index": choice.index,
            "message": message,
            "logprobs": self.logprobs(choice.logprobs),
            "finish_reason": choice.finish_reason,
        }

    def delta(self, piece: Piece) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if piece.reasoning:
            delta["reasoning_content"] = piece.reasoning
        if piece.content or not (piece.reasoning or piece.calls):
            delta["content"] = piece.content  # (a chunk of logprobs alone has empty content)
        calls = _merged(piece.calls)
        if calls and self.legacy_calls:
            delta["function_call"] = calls[0]["function"]
        elif calls:
            delta["tool_calls"] = calls
        return delta

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs(logprobs),
            "finish_reason": finish_reason,
        }
        return {**self.base(), "choices": [choice]}

    @staticmethod
    def logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        return None if entries is None else {"content": entries, "refusal": None}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return {**self.base(), "choices": [], "usage": done.usage()}


def _merged(deltas: tuple[CallDelta, ...]) -> list[dict[str, Any]]:
    """Pieces of calls in OpenAI's delta shape, one entry per call: the first names it."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d.index:
            out[-1]["function"]["arguments"] += d.arguments
            continue
        entry: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
        if d.id is not None:
            entry.update(id=d.id, type="function")
            entry["function"] = {"name": d.name, "arguments": d.arguments}
        out.append(entry)
    return out
