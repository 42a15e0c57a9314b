"""The prefix rules: which cached tokens a prompt may reuse, and from where.

A prompt reuses what a slot's cache holds of its start (the longest such
slot takes it), copies a longer prefix from another slot or the keeper,
or waits for a slot that is decoding one. Two rules bound every reuse:

- the last prompt token is always decoded again: its logits are what the
  first sampled token needs;
- past the assistant's system prompt, a prefix is reused only within one
  caller's scope (see :attr:`Job.scope`), so that neither the cache
  counters nor the time to the first token tell one caller what another
  asked.

Plain data over a :class:`KvCache`; no ``llama_cpp``.
"""

from __future__ import annotations

from typing import Protocol

from vergeai.runtime.job import Job
from vergeai.runtime.slots import Awaiting, Slot, SlotState

MIN_SHARED = 16  # tokens another slot's cache must add to a slot's own to be copied in
SLACK = 4  # cached tokens a prompt may differ in at the end and still take the slot
KEEP_MIN = 64  # tokens two prompts must share for the keeper to hold them for later ones


class KvCache(Protocol):
    """The cache operations the scheduler needs (a llama.cpp context in production)."""

    n_batch: int
    n_ctx_seq: int

    def reusable(self, seq: int, keep: int) -> bool: ...  # its window before ``keep`` is cached
    def clear_from(self, seq: int, pos: int) -> bool: ...
    def copy_seq(self, src: int, dst: int) -> None: ...


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(tokens: list[int], scope: str, public: int, job: Job) -> int:
    """How much of cached ``tokens`` (a prompt of ``scope`` whose first ``public``
    tokens any caller may share) the job's prompt may reuse."""
    n = common_prefix(tokens, job.tokens)
    return n if scope == job.scope else min(n, public, job.public)


def shared(slot: Slot, job: Job) -> int:
    """How many of the slot's cached tokens the job's prompt may reuse."""
    return reusable(slot.tokens, slot.scope, slot.public, job)


def usable(n: int, job: Job) -> int:
    """Of ``n`` reusable tokens, those the job keeps: never its last prompt token."""
    return min(n, len(job.tokens) - 1)


class Prefixes:
    """Where each prompt's cached prefix comes from, over the slots of one cache."""

    def __init__(self, cache: KvCache, slots: list[Slot], keeper: Slot | None) -> None:
        self.cache = cache
        self.slots = slots
        # A sliding-window model's slot forgets what lies a window before its end, so a
        # shared prefix (a system prompt) is gone from every slot once their answers
        # run long; an extra sequence, never decoded, keeps the latest one two prompts
        # shared, for the requests after them.
        self.keeper = keeper

    def choose_slot(self, job: Job, free: list[Slot]) -> Slot:
        """The free slot whose cache holds most of the job's prompt, unless that would
        throw away another conversation.

        A slot the prompt merely starts like (a shared system prompt, a common
        opening) is kept for its own next turn: another free slot, an empty one
        or else the least recently used, takes the job and gets the shared
        prefix copied in (see :meth:`copy_in`).
        """
        best = max(free, key=lambda s: (shared(s, job), -s.last_used))
        kept = shared(best, job)
        if kept >= len(job.tokens) - 1 or len(best.tokens) - kept <= SLACK or len(free) == 1:
            return best  # a repeat, a follow-up turn, or no choice
        return min((s for s in free if s is not best), key=lambda s: (bool(s.tokens), s.last_used))

    def to_await(self, slot: Slot, job: Job) -> Awaiting | None:
        """Another slot's prompt, still being decoded, that starts like this one for
        MIN_SHARED tokens more than any cache holds now: worth waiting for.

        So requests arriving together with the same system prompt or document
        evaluate it once, not once each side by side.
        """
        caches = [*self.slots, *([self.keeper] if self.keeper is not None else [])]
        held = max(shared(s, job) for s in caches)
        best: Awaiting | None = None
        for s in self.slots:
            if s is slot or s.state != SlotState.PROMPTING or not s.prefilling:
                continue
            assert s.job is not None
            if s.job.embed:
                continue
            coming = usable(reusable(s.tokens + s.pending, s.job.scope, s.job.public, job), job)
            if coming >= held + MIN_SHARED and (best is None or coming > best.until):
                best = Awaiting(s, s.job, coming)
        return best

    def copy_in(self, slot: Slot, job: Job) -> None:
        """Copy in the cache of another slot, busy or not, or the keeper's, that holds
        more of the prompt and can continue it; plan what the keeper gets.

        So a system prompt or a document many requests share is evaluated once
        per worker, not once per slot.
        """
        held = usable(shared(slot, job), job)
        # what it holds past its window is evaluated again by adopt
        own = held if self.cache.reusable(slot.seq, held) else 0
        donors = [
            (shared(s, job), s)
            for s in self.slots
            if s is not slot and s.state != SlotState.FOLLOWING and s.tokens
        ]
        # a prefix seen before: in another slot, or in this one where it is lost
        seen = max([held - own, *(n for n, _ in donors)])
        self._plan_keep(slot, job, usable(seen, job))
        if self.keeper is not None and self.keeper.tokens:
            donors.append((shared(self.keeper, job), self.keeper))
        for n, donor in sorted(donors, key=lambda d: -d[0]):
            n = usable(n, job)
            if n < own + MIN_SHARED:
                return
            if self.cache.reusable(donor.seq, n):
                self.cache.copy_seq(donor.seq, slot.seq)
                slot.hold(list(donor.tokens), donor.scope, donor.public)  # adopt trims it
                return

    def adopt(self, slot: Slot, job: Job) -> int:
        """Trim the slot's cache to what the job reuses of it; how many tokens that is.

        An embedding pools all its tokens, so it keeps nothing.
        """
        keep = 0 if job.embed else usable(shared(slot, job), job)
        if keep < len(slot.tokens) and not self.cache.clear_from(slot.seq, keep):
            self.cache.clear_from(slot.seq, 0)
            keep = 0
        if not self.cache.reusable(slot.seq, keep):  # the window before it is gone
            self.cache.clear_from(slot.seq, 0)
            keep = 0
        slot.hold(slot.tokens[:keep], job.scope, job.public)
        return keep

    def _plan_keep(self, slot: Slot, job: Job, n: int) -> None:
        """A prompt that starts like an earlier one for KEEP_MIN tokens or more: the
        keeper gets that prefix once this slot has decoded it, unless it holds it."""
        slot.keep_at = 0
        if self.keeper is None or n < KEEP_MIN:
            return
        if shared(self.keeper, job) < n:
            slot.keep_at = n

    def keep(self, slot: Slot) -> None:
        """Copy the slot's planned prefix into the keeper, if it has been decoded: its
        sliding-window cells are all still cached just after."""
        if self.keeper is None or not 0 < slot.keep_at <= len(slot.tokens):
            return
        self.cache.copy_seq(slot.seq, self.keeper.seq)
        self.cache.clear_from(self.keeper.seq, slot.keep_at)
        self.keeper.hold(slot.tokens[: slot.keep_at], slot.scope, slot.public)
        slot.keep_at = 0
