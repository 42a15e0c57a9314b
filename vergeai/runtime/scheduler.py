"""The scheduler: which jobs take which slots, and what each step decodes.

It decides; the worker thread (:mod:`vergeai.runtime.worker`) carries the
decisions out against the llama.cpp context and samples. Each step:

1. :meth:`Scheduler.admit` moves waiting jobs, in order, into free slots (a
   request for n choices takes n); each starts on what a cache holds of its
   prompt, copies it from another slot or awaits a slot decoding it
   (:class:`~vergeai.runtime.prefix.Prefixes` owns those rules);
2. :meth:`Scheduler.plan` lays out one batch: every generating slot's next
   token (and draft), then prompt chunks, sized beside generating slots from
   what steps have cost (:class:`~vergeai.runtime.stepcost.StepCost`);
3. after the decode, :meth:`Scheduler.advance` records what each slot now
   caches and says which outputs to sample.

Plain data over a :class:`~vergeai.runtime.prefix.KvCache`; no ``llama_cpp``.
Only the worker thread calls it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from vergeai.runtime.job import Job
from vergeai.runtime.prefix import KvCache, Prefixes
from vergeai.runtime.slots import Slot, SlotState
from vergeai.runtime.speculate import MAX_DRAFT, MAX_DRAFTING
from vergeai.runtime.stepcost import StepCost

LONG_PROMPT = 128  # prompt tokens still to decode beside which a step may carry a few drafts
PROMPTING_DRAFT = 16  # draft tokens, all slots together, in a step that decodes a long prompt

Batch = list[tuple[Slot, list[int]]]  # each slot's tokens in one llama_decode
Entry = tuple[int, int, int, bool]  # token, position, sequence, whether its logits are read


@dataclass
class Ready:
    """A slot whose batch output ``index`` is to be sampled (or pooled, for an embedding);
    its last ``drafted`` cached tokens are a draft, checked at the outputs before it."""

    slot: Slot
    index: int
    drafted: int = 0


class Scheduler:
    def __init__(self, cache: KvCache, n_slots: int, keeper: bool) -> None:
        self.cache = cache
        self.slots = [Slot(seq=i) for i in range(n_slots)]
        keeper_slot = Slot(seq=n_slots, state=SlotState.KEEPER) if keeper else None
        self.prefixes = Prefixes(cache, self.slots, keeper_slot)
        self.cost = StepCost()

    @property
    def free(self) -> int:
        return sum(s.state == SlotState.FREE for s in self.slots)

    @property
    def busy(self) -> int:
        return len(self.slots) - self.free

    def cancelled(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None and s.job.cancelled.is_set()]

    # admission

    def admit(self, waiting: deque[Job]) -> list[Slot]:
        """Move waiting jobs, in order, into free slots; the slots that got one."""
        admitted: list[Slot] = []
        while waiting:
            job = waiting[0]
            if job.cancelled.is_set():
                waiting.popleft()
                continue
            free = [s for s in self.slots if s.state == SlotState.FREE]
            if len(free) < job.slots_needed:
                break
            waiting.popleft()
            slot = self.prefixes.choose_slot(job, free)
            slot.job = job
            self._begin(slot)
            admitted.append(slot)
            spares = sorted((s for s in free if s is not slot), key=lambda s: s.last_used)
            for follower, spare in zip(job.followers, spares, strict=False):
                spare.job, spare.leader, spare.state = follower, slot, SlotState.FOLLOWING
                follower.t_start = time.perf_counter()
                admitted.append(spare)
        return admitted

    def _begin(self, slot: Slot) -> None:
        """Start the slot's job, or have it await a prompt that starts alike."""
        job = slot.job
        assert job is not None
        if not job.embed:
            slot.awaiting = self.prefixes.to_await(slot, job)
            if slot.awaiting is not None:
                slot.state = SlotState.AWAITING
                return
            self.prefixes.copy_in(slot, job)
        keep = self.prefixes.adopt(slot, job)
        slot.state = SlotState.PROMPTING
        slot.pending = job.tokens[keep:]
        job.cache_n = keep
        job.t_start = time.perf_counter()
        self.prefixes.keep(slot)

    def end_waits(self) -> None:
        """Start each awaiting job whose donor has decoded the shared prefix, or left
        (then the job may await another that started since)."""
        for slot in self.slots:
            if slot.awaiting is not None and slot.awaiting.over:
                self._begin(slot)

    # the step

    def plan(self) -> Batch:
        """One batch: each generating slot's next token (and draft), then prompt chunks."""
        budget = self.cache.n_batch
        active = sorted((s for s in self.slots if s.decoding), key=lambda s: s.prefilling)
        # While other sequences are generating, prompts go in chunks: each step
        # gives every one of them its next token, so a long prompt arriving
        # pauses them for one step's time at a time, not for the whole prompt.
        generating = sum(not s.prefilling for s in active)
        drafts = self._draft_budget(active, generating)
        batch: Batch = []
        chunked = False
        for slot in active:
            assert slot.job is not None
            if slot.prefilling and generating and not chunked:
                outputs = self.cache.n_batch - budget  # the generating slots' tokens
                budget = min(budget, self.cost.chunk(outputs, budget))
                chunked = True
            if budget <= 0:
                break
            if slot.job.embed and len(slot.pending) > budget:
                continue  # an embedding input is decoded whole, in a later batch
            if slot.drafted > min(budget - 1, drafts):  # cut short, never split
                slot.drafted = max(0, min(budget - 1, drafts))
                del slot.pending[1 + slot.drafted :]
            drafts -= slot.drafted
            take = slot.pending[:budget]
            batch.append((slot, take))
            budget -= len(take)
        return batch

    @staticmethod
    def _draft_budget(active: list[Slot], generating: int) -> int:
        """Draft tokens in one step, all slots together: each one's logits take a row
        of n_vocab floats (llama.cpp keeps the largest buffer it needed).

        A few while a long prompt is decoded: they add little to its long steps
        and may give a generating sequence several tokens in one instead of one.
        None beside a short prompt, whose step they would lengthen much more.
        None beyond a few generating sequences: their step is long already, and
        ends only when the slowest of them is done.
        """
        if generating > MAX_DRAFTING:
            return 0
        if not any(s.prefilling for s in active):
            return MAX_DRAFT
        long_prompt = any(s.prefilling and len(s.pending) >= LONG_PROMPT for s in active)
        return PROMPTING_DRAFT if long_prompt else 0

    @staticmethod
    def entries(batch: Batch) -> list[Entry]:
        """The batch's entries; logits only after each slot's last pending token, or at
        every token of a draft (each is checked) or an embedding (pooling reads all)."""
        out: list[Entry] = []
        for slot, take in batch:
            base = len(slot.tokens)
            last = len(take) == len(slot.pending)
            every = slot.drafted > 0 or (slot.job is not None and slot.job.embed)
            out += [
                (token, base + i, slot.seq, every or (last and i == len(take) - 1))
                for i, token in enumerate(take)
            ]
        return out

    def measured(self, batch: Batch, seconds: float) -> None:
        """A planned batch took ``seconds`` to decode (before :meth:`advance`)."""
        prompt = sum(len(take) for slot, take in batch if slot.prefilling)
        outputs = sum(len(take) for slot, take in batch if not slot.prefilling)
        self.cost.record(prompt, outputs, seconds)

    def advance(self, batch: Batch) -> list[Ready]:
        """Record a decoded batch; the outputs to sample, in order (n choices: each
        follower gets its leader's cache and is sampled at the leader's output)."""
        index = -1
        ready: list[Ready] = []
        for slot, take in batch:
            index += len(take)
            done = len(take) == len(slot.pending)
            drafted, slot.drafted = slot.drafted, 0
            slot.tokens.extend(take)
            del slot.pending[: len(take)]
            self.prefixes.keep(slot)
            if not done:
                continue
            assert slot.job is not None
            if slot.job.followers:
                ready += [Ready(f, index) for f in self._fork(slot)]
            ready.append(Ready(slot, index, drafted))
        return ready

    def _fork(self, leader: Slot) -> list[Slot]:
        """The leader's prompt is decoded: each follower gets a copy of its cache."""
        assert leader.job is not None
        forked = []
        for slot in self.followers_of(leader):
            self.cache.clear_from(slot.seq, 0)
            self.cache.copy_seq(leader.seq, slot.seq)
            slot.hold(list(leader.tokens), leader.scope, leader.public)
            slot.state = SlotState.PROMPTING
            assert slot.job is not None
            slot.job.cache_n = leader.job.cache_n
            forked.append(slot)
        return forked

    def followers_of(self, leader: Slot) -> list[Slot]:
        """The leader's followers still waiting for its prompt; they wait no more."""
        followers = [s for s in self.slots if s.leader is leader and s.job is not None]
        for slot in followers:
            slot.leader = None
        return followers

    # after sampling

    def draft_room(self, slot: Slot, reliable: bool) -> int | None:
        """How many draft tokens the slot may propose after its token; None: no draft.

        Beside other generating sequences a draft's tokens cost the batch more
        than the steps they might save, unless its drafts mostly hold.
        """
        job = slot.job
        assert job is not None and job.generate is not None
        others = sum(
            s is not slot and s.job is not None and s.job.n_generated > 0 for s in self.slots
        )
        # beyond MAX_DRAFTING generating, plan would drop the draft anyway
        if others >= MAX_DRAFTING or (others and not reliable):
            return None
        # the draft must not end the context earlier than its tokens would
        return min(
            job.generate.max_tokens - job.n_generated - 1,
            self.cache.n_ctx_seq - len(slot.tokens) - 3,
        )

    def generate(self, slot: Slot, token: int, draft: list[int]) -> None:
        """The slot decodes its sampled token next, and the draft after it."""
        slot.state = SlotState.GENERATING
        slot.pending = [token, *draft]
        slot.drafted = len(draft)

    def reject(self, slot: Slot, n: int) -> None:
        """Its last ``n`` cached tokens (a draft the sampler did not pick) are forgotten."""
        if n:
            cut = len(slot.tokens) - n
            self.cache.clear_from(slot.seq, cut)
            del slot.tokens[cut:]

    def forget(self, slot: Slot) -> None:
        """The slot's cache is emptied (an embedding, or a sequence that failed to decode)."""
        self.cache.clear_from(slot.seq, 0)
        slot.tokens.clear()

    def release(self, slot: Slot) -> None:
        slot.reset(time.perf_counter())
