"""A loaded model's worker: a llama.cpp context with N slots, and its thread; every
assistant on the model shares it.

The thread loads the model, then loops: under the lock it admits waiting
jobs (its :class:`~vergeai.runtime.scheduler.Scheduler` decides which slot
and what cached prefix each starts on), then its
:class:`~vergeai.runtime.runner.Runner` decodes the step the scheduler
plans and reports each job's events. Requests wait in a bounded FIFO queue.

The thread is the context's only user (the context checks it). Whatever
goes wrong with one request fails that request alone; anything else that
escapes the loop ends the thread in state ``restarting``, and the pool
starts a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vergeai.errors import QueueFull, Unavailable
from vergeai.gguf import GgufError, check_gguf
from vergeai.runtime.context import Context
from vergeai.runtime.engine import ModelFacts, WorkerState
from vergeai.runtime.job import Failed, Job, Task, hand_over, hold_events
from vergeai.runtime.llama import Model, shared_models
from vergeai.runtime.memory import Cost, buffer_bytes, kv_bytes, resident_bytes
from vergeai.runtime.runner import Runner, Served
from vergeai.runtime.saved import SavedPrefixes
from vergeai.runtime.scheduler import Scheduler
from vergeai.runtime.slots import Slot
from vergeai.runtime.templating import build_template
from vergeai.state.models import ModelRecord

log = logging.getLogger("vergeai.worker")


RESTART_RETRY_AFTER = 2
# seconds one step (decode, masks, sampling) may take before the worker is degraded
STEP_BOUND = 60.0
# one model loads at a time, so that the resident memory a load adds is its own
LOAD_LOCK = threading.Lock()


class Worker:
    def __init__(
        self,
        spec: ModelRecord,
        estimate: Cost,
        saved: SavedPrefixes | None,
        on_idle: Callable[[Worker], None] | None = None,
    ) -> None:
        self.spec = spec  # the model record it loads; the pool updates what needs no reload
        self.saved = saved  # where its cached prefixes go when it unloads idle
        self.on_idle = on_idle  # told, from its thread, each time it has nothing left to do
        self.estimate = estimate  # its memory, before it loads
        self.measured: Cost | None = None  # once loaded: what the load added (see _load)
        self.kv_bytes = 0
        self.name = spec.name
        self.status = WorkerState.LOADING
        self.error: str | None = None
        self.model: Model | None = None
        self.ctx: Context | None = None
        self._facts: ModelFacts | None = None
        self.sched: Scheduler | None = None  # once loaded
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.restarts = 0  # how many workers of this model died before this one
        self.ended_at = 0.0  # time.monotonic() when the thread ended
        self.served = Served()
        self.started_at = time.time()
        self.load_seconds = 0.0
        self.ready_at = 0.0  # time.monotonic() when it loaded
        self.step_bound = STEP_BOUND
        self.step_since = 0.0  # time.monotonic() when the running step began; 0: none runs
        self.runner: Runner | None = None  # once loaded
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
        """The thread died while the model should be serving."""
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
        return max(1, self.spec.parallel - 1)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx_seq if self.ctx else self.spec.ctx

    def stats(self) -> dict[str, Any]:
        a = self.spec
        return {
            "model": self.name,
            "model_path": a.file,
            "state": self.state,
            "error": self.problem,
            "restarts": self.restarts,
            "ctx": self.n_ctx,
            "parallel": a.parallel,
            "threads": a.threads or os.cpu_count() or 1,
            "gpu_layers": a.gpu_layers,
            "model_bytes": self.model.size_bytes if self.model else 0,
            "kv_cache_bytes": self.kv_bytes,
            "estimated_bytes": self.estimate.total,
            "measured_bytes": self.measured.total if self.measured else None,
            "requests_served": self.served.requests,
            "busy_slots": self.busy,
            "queue_depth": self.queued,
            "tokens_generated": self.served.tokens,
            "last_prompt_per_second": round(self.served.last_prompt_per_second, 2),
            "last_predicted_per_second": round(self.served.last_predicted_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    # called from the event loop

    def submit(self, job: Task) -> None:
        if not isinstance(job, Job):
            raise TypeError(f"model {self.name!r} takes local model jobs only")
        with self.cond:
            if self.stopping or self.status != WorkerState.ONLINE:
                raise Unavailable(f"model {self.name!r} is being unloaded", retry_after=5)
            assert self.sched is not None  # loaded: it is online
            free = self.sched.free
            if any(j.cancelled.is_set() for j in self.waiting):  # their clients left
                self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.spec.max_queue + free:
                raise QueueFull(
                    f"model {self.name!r} has {len(self.waiting)} requests waiting; "
                    "try again shortly",
                    retry_after=1,
                )
            self.waiting.append(job)
            self.cond.notify_all()

    # the worker thread

    def _run(self) -> None:
        try:
            runner = self._load()
        except Exception as exc:  # llama.cpp reports load failures many ways
            self.error = str(exc) or type(exc).__name__
            if isinstance(exc, GgufError):
                self.error = f"model file {self.spec.file}: {exc}"
            self._set_status(WorkerState.ERROR)
            log.error("model %s failed to load: %s", self.name, self.error)
            self._release()
            self.ended_at = time.monotonic()
            return
        self.ready_at = time.monotonic()
        self._set_status(WorkerState.ONLINE)
        log.info("model %s loaded in %.2fs", self.name, self.load_seconds)
        hold_events()
        try:
            while self._step(runner):
                pass
        except Exception as exc:
            log.exception("model %s: the worker thread died; it will be restarted", self.name)
            self.error = f"worker thread died: {exc}"
            self._set_status(WorkerState.RESTARTING)
            for slot in runner.sched.slots:
                if slot.job:
                    slot.job.emit(Failed(self.error, retry_after=RESTART_RETRY_AFTER))
        finally:
            with self.cond:
                gone = "is restarting" if self.status == WorkerState.RESTARTING else "was unloaded"
                for job in self.waiting:
                    job.emit(Failed(f"model {self.name!r} {gone}", retry_after=1))
                self.waiting.clear()
                if self.status == WorkerState.ONLINE and self.stopping:
                    self.status = WorkerState.OFFLINE
            hand_over()
            if self.status == WorkerState.OFFLINE and self.saved is not None:
                save_prefixes(self.saved, self.spec, self.ctx, runner.sched)
            self._release()
            self.ended_at = time.monotonic()

    def _load(self) -> Runner:
        """Load the model (shared with other workers on its file) and make its context."""
        t0 = time.perf_counter()
        a = self.spec
        info = check_gguf(a.file)
        with LOAD_LOCK:
            before = resident_bytes()
            self.model = model = shared_models.acquire(a.file, a.gpu_layers)
            with_weights = resident_bytes()
            keeper = model.n_swa > 0 and not a.embedding  # see Prefixes.keeper
            template = None
            if a.embedding:
                ctx = Context(
                    model, a.ctx, a.parallel, a.threads, model.pooling(), a.kv_type, a.flash_attn
                )
            else:
                template = build_template(a, model)
                ctx = Context(
                    model, a.ctx, a.parallel + keeper, a.threads, None, a.kv_type, a.flash_attn
                )
            self.ctx = ctx
            # the weights a load of the same file shares add nothing; the compute and
            # output buffers are resident only once the largest steps have run
            self.measured = Cost(
                max(0, with_weights - before),
                max(0, resident_bytes() - with_weights) + buffer_bytes(info, a),
            )
        self.kv_bytes = kv_bytes(info, a)
        self.sched = Scheduler(ctx, a.parallel, keeper)
        if self.saved is not None and not a.embedding:
            restored = self.saved.restore(a, ctx, caches(self.sched))
            if restored:
                log.info("model %s: %d cached prefixes restored", self.name, restored)
        self.load_seconds = time.perf_counter() - t0
        self._facts = ModelFacts(ctx.n_ctx_seq, model, template, a.embedding)
        self.runner = Runner(self.name, model, ctx, self.sched, a.speculate == "ngram", self.served)
        return self.runner

    def update(self, spec: ModelRecord) -> None:
        """Settings that need no reload (queue, speculation, when it loads) take effect."""
        self.spec = spec
        if self.runner is not None:
            self.runner.speculate = spec.speculate == "ngram"

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

    def _step(self, runner: Runner) -> bool:
        """Admit waiting jobs, then decode one batch; False once stopped and idle."""
        sched = runner.sched
        told = False
        with self.cond:
            while True:
                for slot in sched.cancelled():
                    runner.finish(slot, None)
                if self.stopping:
                    for job in self.waiting:
                        job.emit(Failed(f"model {self.name!r} was unloaded"))
                    self.waiting.clear()
                for slot in sched.admit(self.waiting):
                    runner.open(slot)
                if sched.busy:
                    break
                if self.stopping:
                    return False
                hand_over()
                if self.on_idle is not None and not told:
                    told = True
                    self.cond.release()  # the pool's lock is taken before a worker's
                    try:
                        self.on_idle(self)
                    finally:
                        self.cond.acquire()
                    continue
                self.cond.wait()
        self.step_since = time.monotonic()
        try:
            runner.step()
        finally:
            self.step_since = 0.0
        return True


def caches(sched: Scheduler) -> list[Slot]:
    """Every sequence that holds a cached prefix: the slots, and the keeper."""
    keeper = sched.prefixes.keeper
    return [*sched.slots, *([keeper] if keeper is not None else [])]


def save_prefixes(
    saved: SavedPrefixes, spec: ModelRecord, ctx: Context | None, sched: Scheduler
) -> None:
    """An unload: what the slots' caches hold is kept on disk for the next load."""
    if spec.embedding or ctx is None:
        return
    try:
        n = saved.save(spec, ctx, caches(sched))
    except OSError as exc:
        log.warning("model %s: cached prefixes not saved: %s", spec.name, exc)
        return
    if n:
        log.info("model %s: %d cached prefixes saved", spec.name, n)
