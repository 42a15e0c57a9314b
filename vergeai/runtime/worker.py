"""One online assistant: a llama.cpp context with N slots, decoded by one thread.

The thread is the context's only user. Requests wait in a bounded FIFO
queue; each step it moves waiting jobs into free slots (the slot whose
cached tokens share the longest prefix with the prompt; a prefix another
slot holds, or is decoding, is copied from it), then decodes one batch
holding every active slot's next tokens (continuous batching), and samples
each slot with its own sampler chain.

Whatever goes wrong with one request (its sampler, a failed decode of its
tokens, an exception while sampling it) fails that request alone and frees
its slot; the other slots keep generating. Anything else that escapes the
loop ends the thread in state ``restarting``, and the pool starts a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from vergeai.errors import ContextOverflow, InvalidRequest, QueueFull, Unavailable
from vergeai.gguf import GgufError, check_gguf
from vergeai.runtime.constraint import NoTokenAllowed
from vergeai.runtime.context import Context
from vergeai.runtime.engine import ModelFacts, WorkerState
from vergeai.runtime.job import (
    Embedded,
    Failed,
    FinishReason,
    Job,
    hand_over,
    hold_events,
)
from vergeai.runtime.llama import Model, shared_models
from vergeai.runtime.prompt import ChatTemplate, Message
from vergeai.runtime.reasoning import close_open_think, prompt_opens_think
from vergeai.runtime.scheduler import Ready, Scheduler
from vergeai.runtime.sequence import Sequence
from vergeai.runtime.slots import Slot
from vergeai.runtime.templating import build_template
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.worker")


@dataclass
class Rendered:
    text: str
    tokens: list[int]
    opens_think: bool  # the prompt leaves a <think> block open: output starts as reasoning


RESTART_RETRY_AFTER = 2
STEP_BOUND = (
    60.0  # seconds one step (decode, masks, sampling) may take before the worker is degraded
)


class Worker:
    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self.name = assistant.name
        self.status = WorkerState.LOADING
        self.error: str | None = None
        self.model: Model | None = None
        self.ctx: Context | None = None
        self.template: ChatTemplate | None = None
        self._facts: ModelFacts | None = None
        self.sched: Scheduler | None = None  # once loaded
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.restarts = 0  # how many workers of this assistant died before this one
        self.ended_at = 0.0  # time.monotonic() when the thread ended
        self.requests_served = 0
        self.tokens_generated = 0
        self.started_at = time.time()
        self.load_seconds = 0.0
        self.last_prompt_per_second = 0.0
        self.last_predicted_per_second = 0.0
        self.step_bound = STEP_BOUND
        self.step_since = 0.0  # time.monotonic() when the running step began; 0: none runs
        self.thread = threading.Thread(target=self._run, name=f"worker-{self.name}", daemon=True)

    # lifecycle

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Refuse new work, fail queued jobs, let active ones finish, then free."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def facts(self) -> ModelFacts | None:
        """The loaded model's facts for the API; None until it is loaded."""
        return self._facts

    @property
    def crashed(self) -> bool:
        """The thread died while the assistant should be serving."""
        return (
            not self.stopping
            and self.ended_at > 0
            and self.status in (WorkerState.ONLINE, WorkerState.RESTARTING)
        )

    @property
    def state(self) -> WorkerState:
        """What the worker can do now, a dead thread counted as restarting."""
        if self.crashed:
            return WorkerState.RESTARTING
        if self.status == WorkerState.ONLINE and self.stuck_for > self.step_bound:
            return WorkerState.DEGRADED
        return self.status

    @property
    def stuck_for(self) -> float:
        """Seconds the running step has taken so far (0 between steps)."""
        since = self.step_since
        return time.monotonic() - since if since else 0.0

    @property
    def problem(self) -> str | None:
        """What keeps it from serving, for /health and the workers view."""
        if self.state == WorkerState.DEGRADED:
            return (
                f"one step has run for {self.stuck_for:.0f} s, past its bound of "
                f"{self.step_bound:g} s"
            )
        return self.error

    @property
    def busy(self) -> int:
        return self.sched.busy if self.sched is not None else 0

    @property
    def share(self) -> int:
        """The most slots one request may hold at once: all but one, so that it never
        holds every slot while another request waits (all of them with one slot)."""
        return max(1, self.assistant.parallel - 1)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx_seq if self.ctx else self.assistant.ctx

    def stats(self) -> dict[str, Any]:
        a = self.assistant
        return {
            "assistant": self.name,
            "model": a.display_model,
            "model_path": a.model,
            "state": self.state,
            "error": self.problem,
            "restarts": self.restarts,
            "ctx": self.n_ctx,
            "parallel": a.parallel,
            "threads": a.threads or os.cpu_count() or 1,
            "gpu_layers": a.gpu_layers,
            "model_bytes": self.model.size_bytes if self.model else 0,
            "kv_cache_bytes": self.ctx.kv_bytes if self.ctx else 0,
            "requests_served": self.requests_served,
            "busy_slots": self.busy,
            "queue_depth": self.queued,
            "tokens_generated": self.tokens_generated,
            "last_prompt_per_second": round(self.last_prompt_per_second, 2),
            "last_predicted_per_second": round(self.last_predicted_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    # called from the event loop

    def check_prompt(self, tokens: list[int], param: str = "messages") -> None:
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(
                f"the request has {len(tokens)} prompt tokens, more than the assistant's "
                f"context of {self.n_ctx} tokens allows",
                param=param,
                extra={"n_prompt_tokens": len(tokens), "n_ctx": self.n_ctx},
            )

    def tokenize(self, text: str) -> list[int]:
        assert self.model is not None
        return self.model.tokenize(text)

    def render(
        self,
        messages: list[Message],
        enable_thinking: bool | None,
        tools: list[dict[str, Any]] | None = None,
        continue_final: bool = False,
    ) -> Rendered:
        """Messages (and tools) to prompt tokens, thinking switched as asked where it can be.

        A template without an enable_thinking switch that opens a think block
        itself gets that block closed empty when thinking is off.
        ``continue_final``: the final assistant message is continued, not closed.
        """
        assert self.template is not None and self.model is not None
        text = self.template.render(
            messages, enable_thinking=enable_thinking, tools=tools, continue_final=continue_final
        )
        if enable_thinking is False and not self.template.supports_thinking:
            text = close_open_think(text)
        return Rendered(text, self.model.tokenize(text), prompt_opens_think(text))

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping or self.status != WorkerState.ONLINE:
                raise Unavailable(f"assistant {self.name!r} is going offline", retry_after=5)
            assert self.sched is not None  # loaded: it is online
            free = self.sched.free
            if any(j.cancelled.is_set() for j in self.waiting):  # their clients left
                self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.assistant.max_queue + free:
                raise QueueFull(
                    f"assistant {self.name!r} has {len(self.waiting)} requests waiting; "
                    "try again shortly",
                    retry_after=1,
                )
            self.waiting.append(job)
            self.cond.notify_all()

    # the worker thread

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            a = self.assistant
            check_gguf(a.model)
            self.model = shared_models.acquire(a.model, a.gpu_layers)
            keeper = self.model.n_swa > 0 and not a.embedding  # see Prefixes.keeper
            if a.embedding:
                pooling = self.model.pooling()
                self.ctx = Context(self.model, a.ctx, a.parallel, a.threads, pooling)
            else:
                self.template = build_template(a, self.model)
                self.ctx = Context(self.model, a.ctx, a.parallel + keeper, a.threads)
            self.sched = Scheduler(self.ctx, a.parallel, keeper)
        except Exception as exc:  # llama.cpp reports load failures many ways
            self.error = str(exc) or type(exc).__name__
            if isinstance(exc, GgufError):
                self.error = f"model file {a.model}: {exc}"
            self._set_status(WorkerState.ERROR)
            log.error("assistant %s failed to load: %s", self.name, self.error)
            self._release()
            return
        self.load_seconds = time.perf_counter() - t0
        self._facts = ModelFacts(self.ctx.n_ctx_seq, self.model, self.template, a.embedding)
        self._set_status(WorkerState.ONLINE)
        log.info("assistant %s online in %.2fs", self.name, self.load_seconds)
        hold_events()
        try:
            while self._step():
                pass
        except Exception as exc:
            log.exception("assistant %s: the worker thread died; it will be restarted", self.name)
            self.error = f"worker thread died: {exc}"
            self._set_status(WorkerState.RESTARTING)
            for slot in self.sched.slots if self.sched is not None else []:
                if slot.job:
                    slot.job.emit(Failed(self.error, retry_after=RESTART_RETRY_AFTER))
        finally:
            with self.cond:
                gone = "is restarting" if self.status == WorkerState.RESTARTING else "went offline"
                for job in self.waiting:
                    job.emit(Failed(f"assistant {self.name!r} {gone}", retry_after=1))
                self.waiting.clear()
                if self.status == WorkerState.ONLINE and self.stopping:
                    self.status = WorkerState.OFFLINE
            hand_over()
            self._release()
            self.ended_at = time.monotonic()

    def _set_status(self, status: WorkerState) -> None:
        with self.cond:
            self.status = status

    def _release(self) -> None:
        self._facts = None
        for slot in self.sched.slots if self.sched is not None else []:
            if slot.run is not None:
                slot.run.close()
        if self.ctx is not None:
            self.ctx.free()
            self.ctx = None
        if self.model is not None:
            shared_models.release(self.model)
            self.model = None

    def _step(self) -> bool:
        """Admit waiting jobs, then decode one batch; False once stopped and idle."""
        assert self.sched is not None
        with self.cond:
            while True:
                for slot in self.sched.cancelled():
                    self._finish(slot, None)
                if self.stopping:
                    for job in self.waiting:
                        job.emit(Failed(f"assistant {self.name!r} went offline"))
                    self.waiting.clear()
                for slot in self.sched.admit(self.waiting):
                    self._open(slot)
                if self.sched.busy:
                    break
                if self.stopping:
                    return False
                hand_over()
                self.cond.wait()
        self.step_since = time.monotonic()
        try:
            self._decode_step()
        finally:
            self.step_since = 0.0
        return True

    def _open(self, slot: Slot) -> None:
        """Give an admitted job its sequence (sampler, grammar, decoder, stops, drafter)."""
        assert self.model is not None and self.ctx is not None and slot.job is not None
        try:
            speculate = self.assistant.speculate == "ngram"
            slot.run = Sequence(slot.job, self.model, self.ctx.n_ctx_seq, speculate)
        except Exception as exc:
            self._fail(slot, f"could not start generating: {exc}", exc)

    def _decode_step(self) -> None:
        """Decode one batch, as the scheduler plans it, and sample what it says.

        If llama_decode refuses the batch, each slot's part is decoded on its
        own, so only a request whose own tokens fail is failed.
        """
        assert self.ctx is not None and self.sched is not None
        self.sched.end_waits()
        batch = self.sched.plan()
        hand_over()  # the last step's events go out while this one decodes
        status = self.ctx.decode(self.sched.entries(batch))
        if status == 0:
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
                self._fail(slot, f"the model failed to decode this request (status {status})")

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
                self._finish(r.slot, None)
            except Exception as exc:
                what = "embedding" if job.embed else "sampling"
                self._fail(r.slot, f"{what} failed: {exc}", exc)

    def _embed(self, slot: Slot) -> None:
        """Report the pooled embedding and end the job; the sequence is not kept."""
        assert self.ctx is not None and self.sched is not None and slot.job is not None
        slot.job.t_first = time.perf_counter()
        slot.job.emit(Embedded(self.ctx.embedding(slot.seq)))
        self._finish(slot, "stop")
        self.sched.forget(slot)

    def _sample(self, slot: Slot, index: int, drafted: int = 0) -> None:
        """Sample the slot's next token from the batch output at ``index``.

        With a draft (the slot's last ``drafted`` tokens, decoded at the outputs
        before ``index``), sample position by position from the first: each
        draft token the sampler picks itself is kept, the first it does not is
        replaced by the sampler's token, and the cache forgets the rest.
        """
        assert self.ctx is not None and self.sched is not None
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
            self._finish(slot, reason)
            return
        proposal: list[int] = []
        room = None if run.drafter is None else self.sched.draft_room(slot, run.drafter.reliable)
        if room is not None:
            assert run.drafter is not None
            proposal = run.drafter.propose([*slot.tokens, token], room)
        self.sched.generate(slot, token, proposal)

    def _fail(self, slot: Slot, message: str, exc: Exception | None = None) -> None:
        """Fail the slot's request alone; the others keep generating."""
        if exc is not None:
            log.error("assistant %s: a request failed: %s", self.name, message, exc_info=exc)
        else:
            log.error("assistant %s: a request failed: %s", self.name, message)
        assert slot.job is not None
        slot.job.emit(Failed(message))
        self._finish(slot, None)

    def _finish(self, slot: Slot, reason: FinishReason | None) -> None:
        """End the slot's job; reason None means cancelled or failed (nothing more sent)."""
        assert self.sched is not None
        job, run = slot.job, slot.run
        assert job is not None
        if reason is not None:
            assert run is not None
            timings = run.finish(reason)
            self.requests_served += 1
            self.last_prompt_per_second = timings.prompt_per_second
            self.last_predicted_per_second = timings.predicted_per_second
        self.tokens_generated += job.n_generated
        # the shared prompt was never decoded: the leader failed or was cancelled,
        # which ends the whole request, so the followers just end
        for follower in self.sched.followers_of(slot):
            self._finish(follower, None)
        if run is not None:
            run.close()
        self.sched.release(slot)
