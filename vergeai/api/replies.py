"""OpenAI response objects for one chat completion, whole or as stream chunks."""

from __future__ import annotations

import secrets
import time
from typing import Any

from vergeai.api.generation import Choice, Done


class Reply:
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

    def whole(self, done: Done) -> dict[str, Any]:
        return {
            **self.base(),
            "choices": [self._choice(c) for c in done.choices],
            "usage": done.usage(),
            "timings": done.timings.to_json(),
        }

    def _choice(self, choice: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning
        return {
            "index": choice.index,
            "message": message,
            "logprobs": self.logprobs(choice.logprobs),
            "finish_reason": choice.finish_reason,
        }

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
