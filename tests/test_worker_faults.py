"""Faults inside a model worker, on the real model: one request fails alone, a dead thread restarts.

The faults are injected by patching the sequence a job runs as, the scheduler
or one llama call, for one request (the one whose prompt holds a marker
token); everything else is the real llama.cpp context and worker thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import NO_EOS

from vergeai.pool import Pool
from vergeai.runtime import runner
from vergeai.runtime.engine import WorkerState
from vergeai.runtime.job import Delta, Event, Failed, Finished, Generate, Job
from vergeai.runtime.sampling import Sampling
from vergeai.runtime.sequence import Sequence
from vergeai.runtime.worker import Worker
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord
from vergeai.state.store import State

MARKER = 9999  # a token id that only the faulty request's prompt holds
BAN_EOS = {int(token): float(bias) for token, bias in NO_EOS.items()}  # as Sampling takes it


ASSISTANT = Assistant(name="gemma", model="gemma")


def sampling(seed: int = 1) -> Sampling:
    return Sampling(
        temperature=0.0, top_p=1.0, top_k=40, min_p=0.05, seed=seed, presence_penalty=0.0,
        frequency_penalty=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias=dict(BAN_EOS),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pool(model_path: str) -> Iterator[Pool]:
    spec = ModelRecord(
        name="gemma", file=model_path, chat_format="gemma", ctx=256, parallel=2, threads=2,
        load="always",
    )  # fmt: skip
    state = State(models={"gemma": spec}, assistants={"gemma": ASSISTANT})
    pool = Pool()
    pool.reconcile(state)
    wait_online(pool)
    yield pool
    pool.close()


def wait_online(pool: Pool, timeout: float = 30) -> Worker:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool.heal()
        worker = pool.models.get("gemma")
        if worker is not None and worker.status == WorkerState.ONLINE and not worker.crashed:
            return worker
        time.sleep(0.05)
    raise AssertionError("the worker did not come online")


async def generate(worker: Worker, tokens: list[int], max_tokens: int = 12) -> list[Event]:
    job = Job(tokens=tokens, generate=Generate(sampling(), max_tokens, []),
              loop=asyncio.get_running_loop())  # fmt: skip
    worker.submit(job)
    events: list[Event] = []
    while not events or isinstance(events[-1], Delta):
        _, event = await job.queue.get()
        events.append(event)
    return events


async def side_by_side(worker: Worker) -> tuple[list[Event], list[Event]]:
    good = tokenize(
        worker, "<start_of_turn>user\nCount to ten.<end_of_turn>\n<start_of_turn>model\n"
    )
    bad = [*good[:-1], MARKER, good[-1]]
    return await asyncio.gather(generate(worker, good, 24), generate(worker, bad))


def tokenize(worker: Worker, text: str) -> list[int]:
    assert worker.facts is not None
    return worker.facts.model.tokenize(text)


def outcome(events: list[Event]) -> type:
    return type(events[-1])


def check_isolated(worker: Worker, good: list[Event], bad: list[Event]) -> None:
    assert outcome(bad) is Failed, bad
    assert outcome(good) is Finished, good
    done = good[-1]
    assert isinstance(done, Finished) and done.completion_tokens == 24
    assert sum(len(e.text) for e in good if isinstance(e, Delta)) > 0
    deadline = time.monotonic() + 2  # the slot is freed just after the last event is sent
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.status == WorkerState.ONLINE and worker.busy == 0


def test_a_failing_sampler_fails_only_its_request(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)

    def start(job: Job, *args: Any) -> Sequence:
        if MARKER in job.tokens:
            raise RuntimeError("this function takes at least 5 arguments (4 given)")
        return Sequence(job, *args)

    monkeypatch.setattr(runner, "Sequence", start)
    good, bad = asyncio.run(side_by_side(worker))
    check_isolated(worker, good, bad)
    failed = bad[-1]
    assert isinstance(failed, Failed) and "5 arguments" in failed.message
    assert failed.retry_after is None


def test_a_failing_decode_fails_only_its_request(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)
    assert worker.ctx is not None
    ctx = worker.ctx
    real = ctx.decode

    def decode(entries: list[tuple[int, int, int, bool]]) -> int:
        if any(token == MARKER for token, *_ in entries):
            return -1
        return real(entries)

    monkeypatch.setattr(ctx, "decode", decode)
    good, bad = asyncio.run(side_by_side(worker))
    check_isolated(worker, good, bad)


def test_an_exception_while_sampling_fails_only_its_request(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)
    real = Sequence.sample

    def sample(run: Sequence, ctx: Any, at: int) -> Any:
        if MARKER in run.job.tokens and run.job.n_generated >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(run, ctx, at)

    monkeypatch.setattr(Sequence, "sample", sample)
    good, bad = asyncio.run(side_by_side(worker))
    check_isolated(worker, good, bad)
    assert sum(isinstance(e, Delta) for e in bad) > 0  # it failed mid-answer


def test_a_dead_worker_thread_is_restarted_without_an_admin(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)

    def die() -> None:
        raise MemoryError("the worker loop itself broke")

    assert worker.sched is not None
    monkeypatch.setattr(worker.sched, "plan", die)
    good, bad = asyncio.run(side_by_side(worker))
    for events in (good, bad):
        failed = events[-1]
        assert isinstance(failed, Failed) and failed.retry_after is not None
    worker.join(10)
    assert worker.crashed
    assert pool.state_of(ASSISTANT) == WorkerState.RESTARTING
    assert worker.stats()["state"] == "restarting"
    replacement = wait_online(pool)
    assert replacement is not worker
    assert replacement.restarts == 1
    good, bad = asyncio.run(side_by_side(replacement))
    assert outcome(good) is Finished and outcome(bad) is Finished


async def two_choices(worker: Worker, tokens: list[int]) -> list[tuple[int, Event]]:
    """A request for two choices: its events until it fails (marked) or both finish."""
    loop = asyncio.get_running_loop()
    leader, follower = (
        Job(tokens=tokens, generate=Generate(sampling(), 6, []), loop=loop, choice=i)
        for i in range(2)
    )
    leader.followers = [follower]
    follower.queue = leader.queue
    worker.submit(leader)
    seen: list[tuple[int, Event]] = []
    while sum(not isinstance(e, Delta) for _, e in seen) < (1 if MARKER in tokens else 2):
        seen.append(await leader.queue.get())
    return seen


def check_n_choices_fail_alone(worker: Worker) -> None:
    good = tokenize(worker, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    failed = asyncio.run(two_choices(worker, [*good[:-1], MARKER, good[-1]]))
    assert [type(e) for _, e in failed] == [Failed]  # the leader's failure ends the request
    deadline = time.monotonic() + 2
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.busy == 0 and worker.status == WorkerState.ONLINE and not worker.crashed
    ended = [e for _, e in asyncio.run(two_choices(worker, good)) if isinstance(e, Finished)]
    assert len(ended) == 2 and all(e.completion_tokens == 6 for e in ended)


def test_a_failing_prompt_of_n_choices_frees_every_slot(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)
    assert worker.ctx is not None
    ctx = worker.ctx
    real = ctx.decode

    def decode(entries: list[tuple[int, int, int, bool]]) -> int:
        return -1 if any(token == MARKER for token, *_ in entries) else real(entries)

    monkeypatch.setattr(ctx, "decode", decode)
    check_n_choices_fail_alone(worker)


def test_n_choices_whose_first_cannot_start_free_every_slot(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)

    def start(job: Job, *args: Any) -> Sequence:
        if MARKER in job.tokens and job.choice == 0:
            raise RuntimeError("no sampler for you")
        return Sequence(job, *args)

    monkeypatch.setattr(runner, "Sequence", start)
    check_n_choices_fail_alone(worker)


def test_a_step_past_its_bound_shows_the_worker_degraded(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wait_online(pool)
    assert worker.ctx is not None
    ctx = worker.ctx
    real = ctx.decode
    wedged = threading.Event()

    def decode(entries: list[tuple[int, int, int, bool]]) -> int:
        if any(token == MARKER for token, *_ in entries) and not wedged.is_set():
            wedged.set()
            time.sleep(1.5)  # a step that takes far longer than its bound
        return real(entries)

    monkeypatch.setattr(ctx, "decode", decode)
    monkeypatch.setattr(worker, "step_bound", 0.3)
    seen: list[tuple[WorkerState, str | None]] = []

    def watch() -> None:
        assert wedged.wait(30)
        time.sleep(0.8)
        seen.append((worker.state, worker.problem))
        seen.append((pool.state_of(ASSISTANT), pool.error(ASSISTANT)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    good, bad = asyncio.run(side_by_side(worker))
    watcher.join()
    assert seen[0][0] == WorkerState.DEGRADED and "past its bound of 0.3 s" in str(seen[0][1])
    assert seen[1][0] == WorkerState.DEGRADED and "one step has run for" in seen[1][1]
    assert outcome(good) is Finished and outcome(bad) is Finished  # slow, not broken
    assert worker.state == WorkerState.ONLINE and worker.problem is None
