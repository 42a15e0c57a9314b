"""Models: a GGUF file and the settings it is loaded with. Local assistants name one.

One loaded model is one model worker (one llama.cpp context, one set of
slots, one prefix cache), shared by every assistant on it. What belongs to
an assistant (its system prompt, thinking, chat history, sampling defaults)
stays on the assistant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from vergeai.state.schema import (
    NAME_RE,
    RecordError,
    check_name,
    check_settings,
    load_record,
    now,
    setting,
    to_table,
)

CHAT_FORMATS = ("gemma", "chatml", "llama-3", "mistral-instruct")
SPECULATION = ("ngram", "off")
KV_TYPES = ("f16", "q8_0", "q4_0")
FLASH_ATTN = ("auto", "on", "off")
LOAD_MODES = ("always", "on-demand", "offline")


def is_model_file(value: str) -> bool:
    """Whether an assistant's ``model`` is a GGUF file's path (the form before model
    records), not a model's name: names have no '/' and do not end in '.gguf'."""
    return "/" in value or value.lower().endswith(".gguf")


@dataclass
class ModelRecord:
    name: str
    file: str = setting("", help="Path of the GGUF file.", metavar="FILE.gguf")
    ctx: int = setting(4096, lo=16, hi=10_000_000, help="Context size in tokens, per slot.")
    parallel: int = setting(1, lo=1, hi=64, help="Requests decoded together.")
    threads: int | None = setting(None, lo=1, hi=1024, help="CPU threads [all].")
    gpu_layers: int = setting(0, lo=-1, hi=100_000, help="Layers to offload to a GPU; -1 = all.")
    chat_format: str | None = setting(
        None,
        choices=CHAT_FORMATS,
        help="Chat template for GGUFs without one [the GGUF's own].",
        metavar="NAME",
    )
    embedding: bool = setting(
        False, help="Serve embeddings (/v1/embeddings) instead of chat.", off="no-embedding"
    )
    speculate: str = setting(
        "ngram",
        choices=SPECULATION,
        help="Draft tokens from the prompt and output (n-gram lookup), checked in one step.",
        metavar="MODE",
    )
    max_queue: int = setting(64, lo=0, hi=100_000, help="Requests that may wait; then 503.")
    kv_type: str = setting(
        "f16",
        choices=KV_TYPES,
        help="Type of the KV cache's keys and values (q8_0 and q4_0 take less memory and need "
        "flash attention).",
        metavar="TYPE",
    )
    flash_attn: str = setting(
        "auto", choices=FLASH_ATTN, help="Flash attention [auto: where the backend has it].",
        metavar="MODE",
    )  # fmt: skip
    load: str = setting(
        "on-demand",
        choices=LOAD_MODES,
        help="always: loaded at start, never unloaded; on-demand: loaded at its first request, "
        "unloaded after keep-alive idle; offline: not loaded. A model no online assistant runs "
        "is not loaded.",
        metavar="MODE",
    )
    keep_alive: float = setting(
        900.0,
        lo=0,
        hi=31_536_000,
        help="Idle seconds before an on-demand model is unloaded.",
        metavar="S",
    )
    created: datetime = field(default_factory=now)

    # what, when changed, needs the context to be built again
    LOAD_SETTINGS = (
        "file", "ctx", "parallel", "threads", "gpu_layers", "chat_format", "embedding", "kv_type",
        "flash_attn",
    )  # fmt: skip
    # the settings an assistant's --model PATH form gave before models were records
    ASSISTANT_SETTINGS = (
        "ctx", "parallel", "threads", "gpu_layers", "chat_format", "embedding", "speculate",
        "max_queue",
    )  # fmt: skip

    def load_key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.LOAD_SETTINGS)

    @property
    def display(self) -> str:
        """The file's name without '.gguf'."""
        base = self.file.rsplit("/", 1)[-1]
        return base[:-5] if base.lower().endswith(".gguf") else base

    def validate(self) -> ModelRecord:
        check_name(self.name)
        if is_model_file(self.name):
            raise RecordError("name", f"{self.name!r}: a model's name has no '/' and no '.gguf'")
        check_settings(self)
        if not self.file:
            raise RecordError("file", "must name a GGUF file")
        if self.kv_type != "f16" and self.flash_attn == "off":
            raise RecordError(
                "kv_type", f"a {self.kv_type} KV cache needs flash attention (--flash-attn auto)"
            )
        return self

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> ModelRecord:
        return load_record(cls, data, name=name)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        data = to_table(self)
        del data["name"]
        return data


def name_for(file: str, taken: set[str]) -> str:
    """A model name made from a GGUF file's name, unlike every name in ``taken``."""
    stem = Path(file).name
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:56] or "model"
    if not NAME_RE.match(stem) or is_model_file(stem):
        stem = "model"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name


def same_settings(a: ModelRecord, b: ModelRecord) -> bool:
    """Whether two records load the same file the same way (names, dates and when they
    are loaded aside)."""
    skip = ("name", "created", "load", "keep_alive")
    return all(getattr(a, f.name) == getattr(b, f.name) for f in fields(a) if f.name not in skip)


def find_or_add(models: dict[str, ModelRecord], wanted: ModelRecord) -> str:
    """The name of a model loading the same file the same way, added under a new name if
    there is none."""
    for name, model in models.items():
        if same_settings(model, wanted):
            return name
    wanted.name = name_for(wanted.file, set(models))
    models[wanted.name] = wanted.validate()
    return wanted.name
