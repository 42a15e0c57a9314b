"""A worker thread's events: held until it hands them over, then delivered in order."""

from __future__ import annotations

import asyncio
import threading

from vergeai.runtime.job import Delta, Generate, Job, hand_over, hold_events
from vergeai.runtime.sampling import Sampling

SAMPLING = Sampling(
    temperature=0.0, top_p=1.0, top_k=40, min_p=0.05, seed=None, presence_penalty=0.0,
    frequency_penalty=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias={},
)  # fmt: skip


def job(loop: asyncio.AbstractEventLoop, choice: int = 0) -> Job:
    return Job(tokens=[2], loop=loop, generate=Generate(SAMPLING, 4, []), choice=choice)


def drain(j: Job) -> list[tuple[int, str]]:
    out = []
    while not j.queue.empty():
        choice, event = j.queue.get_nowait()
        assert isinstance(event, Delta)
        out.append((choice, event.text))
    return out


def test_held_events_wait_for_the_hand_over_then_arrive_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [job(loop, 0), job(loop, 1)]
        emitted = threading.Event()
        go = threading.Event()

        def worker() -> None:
            hold_events()
            for i in range(5):
                jobs[i % 2].emit(Delta(f"t{i}"))
            emitted.set()
            go.wait(5)
            hand_over()
            hand_over()  # nothing held any more: nothing sent twice

        thread = threading.Thread(target=worker)
        thread.start()
        await asyncio.to_thread(emitted.wait, 5)
        await asyncio.sleep(0.05)
        assert jobs[0].queue.empty() and jobs[1].queue.empty()  # held
        go.set()
        await asyncio.to_thread(thread.join, 5)
        await asyncio.sleep(0.05)
        assert drain(jobs[0]) == [(0, "t0"), (0, "t2"), (0, "t4")]
        assert drain(jobs[1]) == [(1, "t1"), (1, "t3")]

    asyncio.run(main())


def test_a_thread_that_holds_nothing_sends_at_once() -> None:
    async def main() -> None:
        j = job(asyncio.get_running_loop())
        thread = threading.Thread(target=lambda: j.emit(Delta("now")))
        thread.start()
        await asyncio.to_thread(thread.join, 5)
        await asyncio.sleep(0.05)
        assert drain(j) == [(0, "now")]

    asyncio.run(main())


def test_events_for_a_closed_loop_cancel_their_job() -> None:
    loop = asyncio.new_event_loop()
    j = job(loop)
    loop.close()

    def worker() -> None:
        hold_events()
        j.emit(Delta("late"))
        hand_over()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert j.cancelled.is_set()
