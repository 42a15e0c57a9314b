"""Which chat template an assistant uses, and whether it can switch thinking off."""

from __future__ import annotations

from dataclasses import dataclass

from vergeai.runtime.llama import LoadError, Model, read_chat_template
from vergeai.runtime.prompt import ChatTemplate
from vergeai.runtime.templates import BUILTIN
from vergeai.state.assistants import Assistant


@dataclass
class TemplateChoice:
    source: str | None
    origin: str  # "chat-format NAME", "gguf" or "none"

    @property
    def thinking_control(self) -> str:
        if self.source is None:
            return "no template"
        if "enable_thinking" in self.source:
            return "yes (the template takes enable_thinking)"
        if "<think>" in self.source:
            return "by closing the think block the template opens"
        return "no (the template has no thinking)"


def choose_template(assistant: Assistant, gguf_template: str | None) -> TemplateChoice:
    """An explicit --chat-format wins; else the GGUF's own template."""
    if assistant.chat_format:
        return TemplateChoice(
            BUILTIN.get(assistant.chat_format), f"chat-format {assistant.chat_format}"
        )
    if gguf_template:
        return TemplateChoice(gguf_template, "gguf")
    return TemplateChoice(None, "none")


def inspect_template(assistant: Assistant) -> TemplateChoice:
    """For `assistant show`: reads the GGUF's metadata only, not its weights."""
    gguf = None if assistant.chat_format else read_chat_template(assistant.model)
    return choose_template(assistant, gguf)


def build_template(assistant: Assistant, model: Model) -> ChatTemplate:
    choice = choose_template(assistant, None if assistant.chat_format else model.chat_template())
    if choice.source is None:
        if assistant.chat_format:
            raise LoadError(f"unknown chat format {assistant.chat_format!r}")
        raise LoadError(
            "the GGUF has no chat template; set one with "
            f"'vergeai assistant edit {assistant.name} --chat-format NAME'"
        )
    return ChatTemplate(choice.source, model.token_text(model.bos), model.token_text(model.eos))
