"""Which chat template a model uses, and whether it can switch thinking off."""

from __future__ import annotations

from dataclasses import dataclass

from vergeai.runtime.llama import LoadError, Model, read_chat_template
from vergeai.runtime.prompt import ChatTemplate
from vergeai.runtime.templates import BUILTIN
from vergeai.state.models import ModelRecord


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


def choose_template(model: ModelRecord, gguf_template: str | None) -> TemplateChoice:
    """An explicit --chat-format wins; else the GGUF's own template."""
    if model.chat_format:
        return TemplateChoice(BUILTIN.get(model.chat_format), f"chat-format {model.chat_format}")
    if gguf_template:
        return TemplateChoice(gguf_template, "gguf")
    return TemplateChoice(None, "none")


def inspect_template(spec: ModelRecord) -> TemplateChoice:
    """For `assistant show`: reads the GGUF's metadata only, not its weights."""
    gguf = None if spec.chat_format else read_chat_template(spec.file)
    return choose_template(spec, gguf)


def build_template(spec: ModelRecord, model: Model) -> ChatTemplate:
    choice = choose_template(spec, None if spec.chat_format else model.chat_template())
    if choice.source is None:
        if spec.chat_format:
            raise LoadError(f"unknown chat format {spec.chat_format!r}")
        raise LoadError(
            "the GGUF has no chat template; set one with "
            f"'vergeai model edit {spec.name} --chat-format NAME'"
        )
    return ChatTemplate(choice.source, model.token_text(model.bos), model.token_text(model.eos))
