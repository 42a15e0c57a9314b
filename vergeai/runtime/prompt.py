"""Messages to prompt text: the assistant's system prompt, then the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vergeai.errors import InvalidRequest
from vergeai.runtime import toolformats
from vergeai.runtime.toolformats import ToolFormat

Message = dict[str, Any]  # role and content; tool_calls, tool_call_id and name where given
PROBE_CALL: list[Message] = [
    {"role": "user", "content": "probe"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "probe0001",
                "type": "function",
                "function": {"name": "probe", "arguments": '{"probe_arg": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "probe0001", "name": "probe", "content": "done"},
]


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


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's ``tojson``: plain JSON, keys in order, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _left_open(text: str, begun: str) -> str:
    """The prompt cut right after the final assistant message's text, where the
    template would close that turn (some templates trim a message's text)."""
    for part in (begun, begun.strip()):
        at = text.rfind(part) if part else -1
        if at >= 0:
            return text[: at + len(part)]
    raise InvalidRequest(
        "the assistant's chat template does not write the final assistant message as given, "
        "so it cannot be continued",
        param="messages",
    )


@dataclass
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self._template = env.from_string(self.source)
        self.tool_format: ToolFormat = toolformats.detect(self.source)
        self.object_arguments = self.tool_format.native and self._takes_object_arguments()

    @property
    def supports_thinking(self) -> bool:
        return "enable_thinking" in self.source

    def _takes_object_arguments(self) -> bool:
        """Whether the template writes calls' arguments with tojson (so wants them as objects)."""
        try:
            text = self._template.render(
                messages=toolformats.with_object_arguments(PROBE_CALL),
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
            )
        except Exception:
            return True
        return '"probe_arg": 1' in text

    def render(
        self,
        messages: list[Message],
        *,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        continue_final: bool = False,
    ) -> str:
        """The prompt; ``tools`` (OpenAI's list) is rendered the template's way, or described.

        ``continue_final``: the last message is the assistant's answer begun
        (a prefill), left open for the model to go on from its last character.
        """
        if not self.tool_format.native:
            messages = toolformats.calls_as_text(messages)
            if tools:
                messages = toolformats.with_tools_described(messages, tools)
        elif self.object_arguments:
            messages = toolformats.with_object_arguments(messages)
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": not continue_final,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools and self.tool_format.native:
            context["tools"] = tools
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        try:
            text = self._template.render(**context)
        except TemplateError as exc:
            # Templates reject message orders they cannot express
            # (e.g. two user turns in a row); that is the caller's input.
            raise InvalidRequest(
                f"the assistant's chat template rejected these messages: {exc}",
                param="messages",
            ) from exc
        return _left_open(text, messages[-1]["content"]) if continue_final else text
