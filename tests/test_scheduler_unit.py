"""The scheduler's decisions, against a small fake KV cache: no model, milliseconds.

Each policy has a test that fails when the policy is broken: admission order,
the slot a prompt takes, what it may reuse (its scope, and never its last
token), copying and awaiting a shared prefix, the keeper, prompt chunks
beside generating sequences, draft budgets, and n choices sharing a prompt.
The real-model tests (test_batching.py, test_cache_scope.py,
test_speculation.py) remain the judge of the whole.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import deque
from collections.abc import Iterator

import pytest

from vergeai.runtime.job import Generate, Job
from vergeai.runtime.prefix import KEEP_MIN, MIN_SHARED
from vergeai.runtime.sampling import Sampling
from vergeai.runtime.scheduler import LONG_PROMPT, MAX_DRAFTING, PROMPTING_DRAFT, Scheduler
from vergeai.runtime.slots import Slot, SlotState
from vergeai.runtime.speculate import MAX_DRAFT
from vergeai.runtime.stepcost import FIRST_CHUNK, MIN_CHUNK, STEP_TARGET


class FakeCache:
    """Per sequence: how many positions it caches, and the first one a sliding window
    of ``window`` tokens still holds (0: no window)."""

    def __init__(self, n_seq: int, n_batch: int = 512, n_ctx_seq: int = 2048, window: int = 0):
        self.n_batch, self.n_ctx_seq, self.window = n_batch, n_ctx_seq, window
        self.length = [0] * n_seq
        self.first = [0] * n_seq
        self.copies: list[tuple[int, int]] = []

    def reusable(self, seq: int, keep: int) -> bool:
        return keep == 0 or not self.window or self.first[seq] <= max(0, keep - self.window)

    def clear_from(self, seq: int, pos: int) -> bool:
        self.length[seq] = min(self.length[seq], pos)
        if pos == 0:
            self.first[seq] = 0
        return True

    def copy_seq(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))
        self.length[dst], self.first[dst] = self.length[src], self.first[src]

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        for _, pos, seq, _ in entries:
            self.length[seq] = max(self.length[seq], pos + 1)
            if self.window:
                self.first[seq] = max(self.first[seq], pos + 1 - self.window)


Loop = asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


SAMPLING = Sampling(
    temperature=0.0, top_p=1.0, top_k=40, min_p=0.0, seed=None, presence_penalty=0.0,
    frequency_penalty=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias={},
)  # fmt: skip


def job(
    loop: asyncio.AbstractEventLoop,
    tokens: list[int],
    scope: str = "alice",
    public: int = 0,
    choices: int = 1,
    max_tokens: int = 100,
) -> Job:
    def one(choice: int) -> Job:
        return Job(tokens=list(tokens), loop=loop, generate=Generate(SAMPLING, max_tokens, []),
                   scope=scope, public=public, choice=choice)  # fmt: skip

    leader = one(0)
    leader.followers = [one(i) for i in range(1, choices)]
    return leader


def prompt(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def step(sched: Scheduler, cache: FakeCache) -> list[tuple[Slot, list[int]]]:
    """One step as the worker runs it, without sampling: plan, decode, advance."""
    sched.end_waits()
    batch = sched.plan()
    cache.decode(sched.entries(batch))
    for ready in sched.advance(batch):
        if ready.slot.job is not None:  # as if it sampled token 7, no draft
            sched.generate(ready.slot, 7, [])
    return batch


def finish(sched: Scheduler, slot: Slot) -> None:
    sched.release(slot)


def setup(n: int, **cache: int) -> tuple[Scheduler, FakeCache, deque[Job]]:
    keeper = bool(cache.get("window"))
    fake = FakeCache(n + keeper, **cache)
    return Scheduler(fake, n, keeper), fake, deque()


def test_admission_is_in_order_and_a_request_for_n_waits_for_n_slots(loop: Loop) -> None:
    sched, _, waiting = setup(2)
    first = job(loop, prompt(0, 10))
    wide = job(loop, prompt(100, 10), choices=2)
    last = job(loop, prompt(200, 10))
    waiting.extend([first, wide, last])
    admitted = sched.admit(waiting)
    assert [s.job for s in admitted] == [first]
    assert list(waiting) == [wide, last]  # the later one does not overtake
    first.cancel()
    finish(sched, admitted[0])
    admitted = sched.admit(waiting)
    assert [s.job for s in admitted] == [wide, wide.followers[0]]
    assert [s.state for s in admitted] == [SlotState.PROMPTING, SlotState.FOLLOWING]


def test_a_follow_up_turn_takes_its_slot_and_reuses_all_but_the_last_token(loop: Loop) -> None:
    sched, cache, waiting = setup(2)
    turn = prompt(0, 50)
    waiting.append(job(loop, turn))
    (slot,) = sched.admit(waiting)
    step(sched, cache)
    finish(sched, slot)
    again = job(loop, [*turn, 7, 8, 9])
    waiting.append(again)
    assert sched.admit(waiting) == [slot]
    assert again.cache_n == 50 and slot.pending == [7, 8, 9]
    step(sched, cache)
    finish(sched, slot)
    same = job(loop, [*turn, 7, 8, 9])
    waiting.append(same)
    sched.admit(waiting)
    assert same.cache_n == len(same.tokens) - 1 and slot.pending == [9]


def test_a_prompt_that_only_starts_alike_takes_another_slot_and_copies_the_prefix(
    loop: Loop,
) -> None:
    sched, cache, waiting = setup(2)
    system = prompt(0, 40)
    waiting.append(job(loop, [*system, *prompt(1000, 30)]))
    (first,) = sched.admit(waiting)
    step(sched, cache)
    finish(sched, first)
    other = job(loop, [*system, *prompt(2000, 30)])
    waiting.append(other)
    (slot,) = sched.admit(waiting)
    assert slot is not first  # the first conversation keeps its slot for its next turn
    assert (first.seq, slot.seq) in cache.copies and other.cache_n == 40


def test_past_the_public_prefix_no_scope_reuses_another_scopes_prompt(loop: Loop) -> None:
    sched, cache, waiting = setup(1)
    secret = prompt(0, 80)
    waiting.append(job(loop, secret, scope="alice", public=20))
    (slot,) = sched.admit(waiting)
    step(sched, cache)
    finish(sched, slot)
    probe = job(loop, secret, scope="bob", public=20)
    waiting.append(probe)
    sched.admit(waiting)
    assert probe.cache_n == 20
    finish(sched, slot)
    own = job(loop, secret, scope="bob", public=20)
    waiting.append(own)
    sched.admit(waiting)
    assert own.cache_n == 20  # its own earlier prompt was cut back to what it shared


def test_a_prompt_awaits_a_slot_decoding_its_start_then_copies_it(loop: Loop) -> None:
    sched, cache, waiting = setup(2, n_batch=256)
    document = prompt(0, 600)
    waiting.append(job(loop, [*document, 1, 2]))
    (donor,) = sched.admit(waiting)
    step(sched, cache)  # 256 of its tokens are decoded
    later = job(loop, [*document, 3, 4])
    waiting.append(later)
    (slot,) = sched.admit(waiting)
    assert slot.state == SlotState.AWAITING and slot.awaiting is not None
    assert slot.awaiting.donor is donor and slot.awaiting.until == 600
    steps = 0
    while slot.state == SlotState.AWAITING:
        steps += 1
        step(sched, cache)
    assert steps == 3  # until the donor had decoded the shared 600 tokens (256 a step)
    assert (donor.seq, slot.seq) in cache.copies and later.cache_n == 600


def test_no_wait_for_a_prefix_shorter_than_what_is_cached_plus_min_shared(loop: Loop) -> None:
    sched, cache, waiting = setup(2, n_batch=64)
    waiting.append(job(loop, [*prompt(0, MIN_SHARED - 1), *prompt(500, 300)]))
    sched.admit(waiting)
    step(sched, cache)
    other = job(loop, [*prompt(0, MIN_SHARED - 1), *prompt(900, 30)])
    waiting.append(other)
    (slot,) = sched.admit(waiting)
    assert slot.state == SlotState.PROMPTING and slot.awaiting is None


def test_the_keeper_holds_a_prefix_two_prompts_shared(loop: Loop) -> None:
    sched, cache, waiting = setup(2, window=32)
    keeper = sched.prefixes.keeper
    assert keeper is not None and keeper.state == SlotState.KEEPER
    system = prompt(0, KEEP_MIN + 10)
    waiting.append(job(loop, [*system, *prompt(1000, 20)]))
    (first,) = sched.admit(waiting)
    step(sched, cache)
    finish(sched, first)
    waiting.append(job(loop, [*system, *prompt(2000, 20)]))
    sched.admit(waiting)
    assert not keeper.tokens  # not decoded yet
    step(sched, cache)
    assert keeper.tokens == system and cache.length[keeper.seq] == len(system)


def test_a_long_prompt_goes_in_chunks_beside_a_generating_sequence(loop: Loop) -> None:
    sched, cache, waiting = setup(2)
    waiting.append(job(loop, prompt(0, 10)))
    sched.admit(waiting)
    step(sched, cache)  # it generates now
    waiting.append(job(loop, prompt(5000, 1000)))
    sched.admit(waiting)
    batch = sched.plan()
    assert [len(take) for _, take in batch] == [1, FIRST_CHUNK]  # nothing measured yet


def beside_one_generating(loop: Loop, per_token: float, per_output: float) -> list[int]:
    """The tokens of a step with one sequence generating and a long prompt, after steps
    that cost ``per_token`` seconds a prompt token and ``per_output`` an output."""
    sched, cache, waiting = setup(2)
    waiting.append(job(loop, prompt(0, 10)))
    sched.admit(waiting)
    step(sched, cache)
    sched.cost.record(0, 1, per_output)  # a step of the generating sequence alone
    sched.cost.record(200, 1, 200 * per_token + per_output)  # one with a prompt beside it
    waiting.append(job(loop, prompt(5000, 1000)))
    sched.admit(waiting)
    return [len(take) for _, take in sched.plan()]


def test_a_prompt_chunk_takes_the_step_time_its_tokens_cost(loop: Loop) -> None:
    # a small model on a CPU: the chunk fills the target step time, less the output's
    chunk = int((STEP_TARGET - 0.02) / 0.002)
    assert FIRST_CHUNK < chunk < 512
    assert beside_one_generating(loop, 0.002, 0.02) == [1, chunk]
    # a fast one (a GPU): the whole batch; a slow one: a short chunk, never under the floor
    assert beside_one_generating(loop, 0.0001, 0.002) == [1, 511]
    assert beside_one_generating(loop, 0.05, 0.5) == [1, MIN_CHUNK]


def test_alone_a_prompt_fills_the_batch(loop: Loop) -> None:
    sched, _, waiting = setup(2)
    waiting.append(job(loop, prompt(0, 1000)))
    sched.admit(waiting)
    assert [len(take) for _, take in sched.plan()] == [512]


def drafting(
    sched: Scheduler, cache: FakeCache, loop: asyncio.AbstractEventLoop, n: int
) -> list[Slot]:
    """``n`` sequences generating, each with a full draft pending."""
    waiting: deque[Job] = deque(job(loop, prompt(1000 * i, 10)) for i in range(n))
    slots = sched.admit(waiting)
    step(sched, cache)
    for slot in slots:
        assert slot.job is not None
        slot.job.n_generated = 1
        sched.generate(slot, 7, list(range(MAX_DRAFT)))
    return slots


def test_draft_budgets(loop: Loop) -> None:
    sched, cache, _ = setup(8)
    drafting(sched, cache, loop, 2)
    assert [s.drafted for s, _ in sched.plan()] == [MAX_DRAFT, 0]  # the first takes the budget
    sched, cache, waiting = setup(8)
    drafting(sched, cache, loop, 2)
    waiting.append(job(loop, prompt(9000, 20)))  # a short prompt: no drafts beside it
    sched.admit(waiting)
    assert [s.drafted for s, _ in sched.plan()] == [0, 0, 0]
    sched, cache, waiting = setup(8)
    drafting(sched, cache, loop, 2)
    waiting.append(job(loop, prompt(9000, 2 * LONG_PROMPT)))  # a long one: a few
    sched.admit(waiting)
    assert sum(s.drafted for s, _ in sched.plan()) == PROMPTING_DRAFT
    sched, cache, _ = setup(8)
    drafting(sched, cache, loop, MAX_DRAFTING + 1)  # many generating: none
    assert sum(s.drafted for s, _ in sched.plan()) == 0


def test_draft_room(loop: Loop) -> None:
    sched, cache, _ = setup(8)
    (alone,) = drafting(sched, cache, loop, 1)
    assert alone.job is not None and alone.job.generate is not None
    room = sched.draft_room(alone, reliable=False)
    assert room == alone.job.generate.max_tokens - alone.job.n_generated - 1
    sched, cache, _ = setup(8)
    slots = drafting(sched, cache, loop, 2)
    assert sched.draft_room(slots[0], reliable=False) is None  # unreliable beside another
    assert sched.draft_room(slots[0], reliable=True) is not None
    sched, cache, _ = setup(8)
    slots = drafting(sched, cache, loop, MAX_DRAFTING + 1)
    assert sched.draft_room(slots[0], reliable=True) is None


def test_logits_are_read_where_they_are_sampled(loop: Loop) -> None:
    sched, cache, _ = setup(2)
    generating, _ = drafting(sched, cache, loop, 2)
    sched.generate(generating, 7, [8, 9])
    entries = Scheduler.entries([(generating, generating.pending)])
    assert [wants for *_, wants in entries] == [True, True, True]  # each draft token is checked
    sched, _, waiting = setup(1)
    waiting.append(job(loop, prompt(0, 5)))
    (slot,) = sched.admit(waiting)
    entries = Scheduler.entries([(slot, slot.pending)])
    assert [wants for *_, wants in entries] == [False] * 4 + [True]


def test_n_choices_decode_the_prompt_once_and_each_is_sampled_at_its_end(loop: Loop) -> None:
    sched, cache, waiting = setup(3)
    waiting.append(job(loop, prompt(0, 30), choices=3))
    leader, *followers = sched.admit(waiting)
    batch = sched.plan()
    assert [s for s, _ in batch] == [leader]  # followers decode nothing of their own
    cache.decode(sched.entries(batch))
    ready = sched.advance(batch)
    assert [r.slot for r in ready] == [*followers, leader]
    assert {r.index for r in ready} == {29}
    assert all((leader.seq, f.seq) in cache.copies and f.tokens == leader.tokens for f in followers)


def test_the_scheduler_and_the_engine_contract_load_no_native_code() -> None:
    code = (
        "import sys, vergeai.runtime.scheduler, vergeai.runtime.engine, vergeai.runtime.sampling;"
        "assert 'llama_cpp' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
