"""A model worker's slots: one llama.cpp sequence each, with a named state.

Plain data for the scheduler; no native objects. A slot's :class:`Sequence`
(sampler, decoder, stops, drafter) is the worker's, held here opaquely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from vergeai.runtime.job import Job

if TYPE_CHECKING:
    from vergeai.runtime.sequence import Sequence


class SlotState(StrEnum):
    FREE = "free"  # no job; its cache is kept for a prompt that starts alike
    AWAITING = "awaiting"  # its job waits for another slot to decode a shared prefix
    PROMPTING = "prompting"  # its job's prompt is being decoded
    GENERATING = "generating"  # its job has sampled a token and decodes the next ones
    FOLLOWING = "following"  # another choice of its leader's request, waiting for its prompt
    KEEPER = "keeper"  # never decoded: holds a shared prefix for sliding-window models


@dataclass
class Awaiting:
    """A prompt waiting for another slot, which is decoding a prompt that starts alike,
    to have decoded the first ``until`` tokens: they are then copied, not decoded again."""

    donor: Slot
    job: Job  # the donor's job; another one there (or none) ends the wait
    until: int

    @property
    def over(self) -> bool:
        return self.donor.job is not self.job or len(self.donor.tokens) >= self.until


@dataclass
class Slot:
    seq: int
    state: SlotState = SlotState.FREE
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds
    scope: str = ""  # whose prompt its cached tokens are (see Job.scope)
    public: int = 0  # how many of them any scope may reuse
    last_used: float = 0.0
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # still to decode
    drafted: int = 0  # the last pending tokens are a draft, this many
    leader: Slot | None = None  # FOLLOWING: whose prompt it waits for
    awaiting: Awaiting | None = None  # AWAITING: what it waits for
    keep_at: int = 0  # once this many prompt tokens are decoded, the keeper gets them
    run: Sequence | None = None  # the worker's side of the job (set when it starts)

    @property
    def decoding(self) -> bool:
        """It has tokens for the next batch."""
        return self.state in (SlotState.PROMPTING, SlotState.GENERATING)

    @property
    def prefilling(self) -> bool:
        """More than one prompt token is still to decode: a prefill, not a token's step
        (a generating slot has its token and, perhaps, a draft)."""
        return len(self.pending) - self.drafted > 1

    def hold(self, tokens: list[int], scope: str, public: int) -> None:
        """Its cache now holds ``tokens`` of ``scope``."""
        self.tokens = tokens
        self.scope, self.public = scope, public

    def reset(self, now: float) -> None:
        """Free it: the job is over; its cached tokens stay for later prompts."""
        self.state = SlotState.FREE
        self.job = None
        self.pending = []
        self.drafted = 0
        self.leader = None
        self.awaiting = None
        self.keep_at = 0
        self.run = None
        self.last_used = now
