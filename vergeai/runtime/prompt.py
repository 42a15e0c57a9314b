"""Messages to prompt text: the assistant's system prompt, then the chat template."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vergeai.errors import InvalidRequest

Message = dict[str, str]


def with_system_prompt(system_prompt: str, messages: list[Message]) -> list[Message]:
    """Put the assistant's system prompt before anything the client sent.

    Many templates honour only a leading system message, so a client's own
    leading system message is joined to it rather than sent as a second one.
    """
    if not system_prompt:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        joined = f"{system_prompt}\n\n{messages[0]['content']}"
        return [{"role": "system", "content": joined}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(self.source)

    @property
    def supports_thinking(self) -> bool:
        return "enable_thinking" in self.source

    def render(self, messages: list[Message], *, enable_thinking: bool | None = None) -> str:
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": True,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        try:
            return self._template.render(**context)
        except TemplateError as exc:
            # Templates reject message orders they cannot express
            # (e.g. two user turns in a row); that is the caller's input.
            raise InvalidRequest(
                f"the assistant's chat template rejected these messages: {exc}",
                param="messages",
            ) from exc
