"""What a request asks of sampling: plain data, no native objects (the remote path reads it too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vergeai.runtime.constraint import Grammar

DEFAULT_SEED = 0xFFFFFFFF


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    repeat_last_n: int  # -1: the whole context
    logit_bias: dict[int, float]
    grammar: Grammar | None = None  # compiled for this model; each sequence starts its own
