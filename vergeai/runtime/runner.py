"""Runs the scheduler's plan against a llama.cpp context, and reports each job's events.

Whatever goes wrong with one request (its sampler, a failed decode of its
tokens, an exception while sampling it) fails that request alone and frees
its slot; the other slots keep generating.

Thread rule: a runner, its context and its sequences belong to one model
worker's thread; nothing here is called from the event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vergeai.errors import InvalidRequest
from vergeai.runtime.constraint import NoTokenAllowed
from vergeai.runtime.context import Context
from vergeai.runtime.job import Embedded, Failed, FinishReason, hand_over
from vergeai.runtime.llama import Model
from vergeai.runtime.scheduler import Ready, Scheduler
from vergeai.runtime.sequence import Sequence
from vergeai.runtime.slots import Slot

log = logging.getLogger("vergeai.worker")


@dataclass
class Served:
    """What a worker has served, for the workers view (written by its thread only)."""

    requests: int = 0
    tokens: int = 0
    last_prompt_per_second: float = 0.0
    last_predicted_per_second: float = 0.0


class Runner:
    def __init__(
        self,
        name: str,
        model: Model,
        ctx: Context,
        sched: Scheduler,
        speculate: bool,
        served: Served,
    ) -> None:
        self.name = name  # the assistant's, for the log
        self.model = model
        self.ctx = ctx
        self.sched = sched
        self.speculate = speculate
        self.served = served

    def open(self, slot: Slot) -> None:
        """Give an admitted job its sequence (sampler, grammar, decoder, stops, drafter)."""
        if slot.job is None:
            return  # a follower whose leader could not start: the request is over
        try:
            slot.run = Sequence(slot.job, self.model, self.ctx.n_ctx_seq, self.speculate)
        except Exception as exc:
            self.fail(slot, f"could not start generating: {exc}", exc)

    def step(self) -> None:
        """Decode one batch, as the scheduler plans it, and sample what it says.

        If llama_decode refuses the batch, each slot's part is decoded on its
        own, so only a request whose own tokens fail is failed.
        """
        self.sched.end_waits()
        batch = self.sched.plan()
        hand_over()  # the last step's events go out while this one decodes
        entries = self.sched.entries(batch)
        started = time.perf_counter()
        status = self.ctx.decode(entries)
        if status == 0:
            self.sched.measured(batch, time.perf_counter() - started)
            self._sample_all(self.sched.advance(batch))
            return
        log.warning(
            "llama_decode failed with status %d on assistant %s; decoding each request apart",
            status,
            self.name,
        )
        for slot, take in batch:
            self.ctx.clear_from(slot.seq, len(slot.tokens))
            status = self.ctx.decode(self.sched.entries([(slot, take)]))
            if status == 0:
                self._sample_all(self.sched.advance([(slot, take)]))
            else:
                self.sched.forget(slot)
                self.fail(slot, f"the model failed to decode this request (status {status})")

    def _sample_all(self, ready: list[Ready]) -> None:
        for r in ready:
            job = r.slot.job
            if job is None:
                continue
            try:
                if job.embed:
                    self._embed(r.slot)
                else:
                    self._sample(r.slot, r.index, r.drafted)
            except NoTokenAllowed as exc:
                run = r.slot.run
                assert run is not None and run.constraint is not None
                log.info("assistant %s: a request ended: %s", self.name, exc)
                param = run.constraint.param
                error = InvalidRequest(f"'{param}': {exc}", param=param)
                job.emit(Failed(str(exc), error=error))
                self.finish(r.slot, None)
            except Exception as exc:
                what = "embedding" if job.embed else "sampling"
                self.fail(r.slot, f"{what} failed: {exc}", exc)

    def _embed(self, slot: Slot) -> None:
        """Report the pooled embedding and end the job; the sequence is not kept."""
        assert slot.job is not None
        slot.job.t_first = time.perf_counter()
        slot.job.emit(Embedded(self.ctx.embedding(slot.seq)))
        self.finish(slot, "stop")
        self.sched.forget(slot)

    def _sample(self, slot: Slot, index: int, drafted: int = 0) -> None:
        """Sample the slot's next token from the batch output at ``index``.

        With a draft (the slot's last ``drafted`` tokens, decoded at the outputs
        before ``index``), sample position by position from the first: each
        draft token the sampler picks itself is kept, the first it does not is
        replaced by the sampler's token, and the cache forgets the rest.
        """
        job, run = slot.job, slot.run
        assert job is not None and run is not None
        draft = slot.tokens[len(slot.tokens) - drafted :]
        accepted = 0
        job.draft_n += drafted  # counted before a token is reported: it may end the job
        for i in range(drafted + 1):
            token, distribution = run.sample(self.ctx, index - drafted + i)
            matched = i < drafted and token == draft[i]
            accepted += matched
            job.draft_accepted += matched
            reason = run.report(token, distribution, len(slot.tokens))
            if not matched or reason is not None:
                break
        self.sched.reject(slot, drafted - accepted)  # decoded for nothing
        if run.drafter is not None:
            run.drafter.record(drafted, accepted)
        if reason is not None:
            self.finish(slot, reason)
            return
        proposal: list[int] = []
        room = None if run.drafter is None else self.sched.draft_room(slot, run.drafter.reliable)
        if room is not None:
            assert run.drafter is not None
            proposal = run.drafter.propose([*slot.tokens, token], room)
        self.sched.generate(slot, token, proposal)

    def fail(self, slot: Slot, message: str, exc: Exception | None = None) -> None:
        """Fail the slot's request alone; the others keep generating."""
        if exc is not None:
            log.error("assistant %s: a request failed: %s", self.name, message, exc_info=exc)
        else:
            log.error("assistant %s: a request failed: %s", self.name, message)
        assert slot.job is not None
        slot.job.emit(Failed(message))
        self.finish(slot, None)

    def finish(self, slot: Slot, reason: FinishReason | None) -> None:
        """End the slot's job; reason None means cancelled or failed (nothing more sent)."""
        job, run = slot.job, slot.run
        assert job is not None
        if reason is not None:
            assert run is not None
            timings = run.finish(reason)
            self.served.requests += 1
            self.served.last_prompt_per_second = timings.prompt_per_second
            self.served.last_predicted_per_second = timings.predicted_per_second
        self.served.tokens += job.n_generated
        # the shared prompt was never decoded: the leader failed or was cancelled,
        # which ends the whole request, so the followers just end
        for follower in self.sched.followers_of(slot):
            self.finish(follower, None)
        if run is not None:
            run.close()
        self.sched.release(slot)
