"""The engines: one model worker per loaded model, shared by every assistant on it, and
the replicas of each remote assistant; kept in step with the state dir.

A model loads as its record says: ``always`` at start (and kept), ``on-demand``
at its first request (and unloaded after ``keep_alive`` seconds idle, or a
request's own ``keep_alive``), or never (``offline``); and only while an
online assistant runs it.

Under a ``memory_budget``, a model loads when its cost (measured at its last
load, else estimated from its GGUF; see :mod:`vergeai.runtime.memory`) fits
beside what the loaded models hold, weights of one file counted once. To
make room, the least recently used idle on-demand models are unloaded; a
model with a request in flight or queued, and an ``always`` one, never are.
When nothing can be unloaded, :class:`NoRoom` says what holds the memory,
and the request waits for a model to become idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vergeai.errors import Unavailable
from vergeai.gguf import GgufError
from vergeai.runtime.engine import Engine, WorkerState
from vergeai.runtime.memory import Cost, estimate
from vergeai.runtime.saved import SavedPrefixes
from vergeai.runtime.worker import Worker
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord
from vergeai.state.store import State
from vergeai.upstream.replicas import Remote

log = logging.getLogger("vergeai.pool")


MAX_RESTART_DELAY = 60.0
FAILED_RETRY_DELAY = 30.0  # seconds before a request loads an on-demand model that failed again
MiB = 1 << 20
WANT_TIMEOUT = 2.0  # seconds after its last request asked before a model leaves the line
CLAIM_GRACE = 0.5  # seconds after a request is routed to a model before it may be unloaded


class NoRoom(Unavailable):
    """A model does not fit the memory budget beside the models loaded now."""

    def __init__(self, message: str, freeing: bool) -> None:
        super().__init__(message, retry_after=5)
        self.freeing = freeing  # models are being unloaded for it: it may fit shortly


class TooBig(Unavailable):
    """A model that does not fit the memory budget even alone."""


class Pool:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root  # the state dir: remote assistants' keys may be in its secrets.toml
        self.models: dict[str, Worker] = {}  # by model name
        self.remotes: dict[str, Remote] = {}  # by assistant name
        self.state = State()  # as last reconciled
        self.used: dict[str, float] = {}  # model name: time.monotonic() of its last request
        self.keep: dict[str, float] = {}  # model name: the last request's keep_alive, if any
        self.load_timeout = 300.0  # seconds a request waits for its model to load
        self.memory_budget = 0  # bytes the loaded models may hold; 0: no budget
        self.memory_wait = 60.0  # seconds a request waits for room in the budget
        self.loads: Counter[str] = Counter()  # by model: loads since start, and unloads
        self.unloads: Counter[str] = Counter()
        self._known: dict[str, tuple[tuple[Any, ...], Cost]] = {}  # model: (load key, cost)
        self.saved: SavedPrefixes | None = None  # where unloaded models' prefixes are kept
        # models requests wait room for: [since, last asked]; the first in line makes room
        self.wanting: dict[str, list[float]] = {}
        self.draining: dict[str, str] = {}  # model: whom it makes room for once idle
        self._retiring: list[Engine] = []
        self._lock = threading.Lock()

    def configure(
        self, load_timeout: float, memory_budget: int, memory_wait: float, saved_prefix_mb: int
    ) -> None:
        self.load_timeout = load_timeout
        self.memory_budget = memory_budget
        self.memory_wait = memory_wait
        if self.root is not None:
            self.saved = SavedPrefixes(self.root / "prefixes", saved_prefix_mb << 20)

    # what the API asks

    def engine_for(self, assistant: Assistant, keep_alive: float | None = None) -> Engine | None:
        """The engine that answers for the assistant; an on-demand model starts loading
        (``keep_alive``: the request's own idle time before it unloads, <0 never).
        None: there is none (a model offline or not defined); NoRoom or TooBig: it
        does not fit the memory budget now."""
        if assistant.remote:
            return self.remotes.get(assistant.name)
        spec = self.state.models.get(assistant.model)
        if spec is None:
            return None
        with self._lock:
            self.used[spec.name] = time.monotonic()
            if keep_alive is None:  # as Ollama: each request says, else the model's own
                self.keep.pop(spec.name, None)
            else:
                self.keep[spec.name] = keep_alive
            worker = self.models.get(spec.name)
            if spec.name in self.draining and worker is not None:
                raise NoRoom(
                    f"model {spec.name!r} is being unloaded to make room for another model; "
                    "it loads again when there is room",
                    freeing=True,
                )
            if spec.load == "on-demand" and self._should_load(worker):
                if self.memory_budget:  # in line for room, unless there is room now
                    now = time.monotonic()
                    self.wanting.setdefault(spec.name, [now, now])[1] = now
                try:
                    self._make_room(spec)
                except TooBig:
                    self.wanting.pop(spec.name, None)
                    raise
                if worker is not None:
                    self._retire_model(spec.name)
                log.info("loading model %s on demand", spec.name)
                worker = self._start_model(spec)
            return worker

    def _first_in_line(self) -> str | None:
        """The model whose requests have waited longest for room (those that stopped
        asking are forgotten, and what was drained for them)."""
        now = time.monotonic()
        for name, (_, last) in list(self.wanting.items()):
            if now - last > WANT_TIMEOUT or name in self.models or name not in self.state.models:
                del self.wanting[name]
        for drained, beneficiary in list(self.draining.items()):
            if beneficiary not in self.wanting:
                del self.draining[drained]
        return min(self.wanting, key=lambda n: self.wanting[n][0], default=None)

    def _idle_now(self, worker: Worker) -> None:
        """A model worker has just become idle (its thread calls this): the model first
        in line for room gets it now, before the next request makes this one busy again
        (between a client's back-to-back requests it is idle for a moment)."""
        with self._lock:
            if self.models.get(worker.name) is not worker:
                return
            first = self._first_in_line()
            if first is None:
                return
            spec = self.state.models[first]
            try:
                self._make_room(spec)
            except Unavailable:
                return  # what it unloaded frees its memory; its request loads it then
            log.info("loading model %s on demand", first)
            self._start_model(spec)

    def load(self, name: str) -> str:
        """An admin's load: the model's state after starting it (a failed one is tried
        again); raises KeyError for a model not defined, ValueError for an offline one,
        NoRoom or TooBig for one that does not fit the memory budget."""
        spec = self.state.models[name]
        if spec.load == "offline":
            raise ValueError(f"model {name!r} is offline; 'vergeai model edit {name} --load …'")
        with self._lock:
            self.used[name] = time.monotonic()
            worker = self.models.get(name)
            if worker is not None and worker.state == WorkerState.ERROR:
                self._retire_model(name)
                worker = None
            if worker is None:
                self._make_room(spec)
                log.info("loading model %s (asked by an admin)", name)
                self._start_model(spec)
        return self.model_state(name)

    def unload(self, name: str) -> str:
        """An admin's unload: in-flight requests finish, queued ones are refused; the state
        after (KeyError for a model not defined). An ``always`` model is loaded again at
        the next change of the state dir, or SIGHUP."""
        self.state.models[name]
        with self._lock:
            if name in self.models:
                self._retire_model(name)
        return self.model_state(name)

    @staticmethod
    def _should_load(worker: Worker | None) -> bool:
        if worker is None:
            return True
        failed = worker.state == WorkerState.ERROR
        return failed and time.monotonic() - worker.ended_at >= FAILED_RETRY_DELAY

    def engine_of(self, assistant: Assistant) -> Engine | None:
        """The assistant's engine if there is one now (loading nothing)."""
        if assistant.remote:
            return self.remotes.get(assistant.name)
        return self.models.get(assistant.model)

    def state_of(self, assistant: Assistant) -> WorkerState:
        """What serving the assistant takes now: its engine's state, or unloaded (an
        on-demand model loads at the first request) or offline."""
        if not assistant.online:
            return WorkerState.OFFLINE
        engine = self.engine_of(assistant)
        spec = self.state.model_of(assistant)
        if engine is None and spec is not None and spec.load == "on-demand":
            return WorkerState.UNLOADED
        return WorkerState.OFFLINE if engine is None else engine.state

    def error(self, assistant: Assistant) -> str:
        if not assistant.remote and assistant.model not in self.state.models:
            return f"its model {assistant.model!r} is not defined"
        engine = self.engine_of(assistant)
        if engine is None:
            return "not loaded"
        return engine.problem or str(engine.state)

    def model_state(self, name: str) -> str:
        """unloaded, loading, loaded, busy, unloading, failed, offline (or restarting,
        degraded): what ``vergeai model list`` and the workers view show."""
        worker = self.models.get(name)
        spec = self.state.models.get(name)
        if worker is None:
            if any(w.name == name and isinstance(w, Worker) for w in self._retiring):
                return "unloading"
            return "offline" if spec is None or spec.load == "offline" else "unloaded"
        state = worker.state
        if state == WorkerState.ERROR:
            return "failed"
        if state == WorkerState.ONLINE:
            return "busy" if worker.busy or worker.queued else "loaded"
        return str(state)

    def model_info(self, name: str) -> dict[str, Any]:
        """A model's state, memory (estimated before a load, measured after), when it was
        last used and when it unloads if it stays idle (seconds from now)."""
        spec = self.state.models[name]
        worker = self.models.get(name)
        now = time.monotonic()
        used = self.used.get(name)
        unloads_at = self.unloads_at(name)
        estimated = worker.estimate if worker is not None else self.cost(spec)
        measured = worker.measured if worker is not None else None
        return {
            "state": self.model_state(name),
            "estimated_bytes": estimated.total,
            "measured_bytes": measured.total if measured else None,
            "last_used_seconds_ago": None if used is None else round(now - used, 1),
            "unloads_in_seconds": (
                None if unloads_at is None else round(max(0.0, unloads_at - now), 1)
            ),
        }

    def stats(self) -> list[dict[str, Any]]:
        """Each engine's figures, a model worker's with the assistants on it."""
        out = []
        for name, worker in sorted(self.models.items()):
            out.append({**worker.stats(), "assistants": self.state.assistants_on(name)})
        return out + [remote.stats() for _, remote in sorted(self.remotes.items())]

    # the memory budget

    def cost(self, spec: ModelRecord) -> Cost:
        """What the model holds loaded: measured at its last load with these settings,
        else estimated from its GGUF (nothing for a file that is not a whole GGUF: its
        load fails at once)."""
        known = self._known.get(spec.name)
        if known is not None and known[0] == spec.load_key():
            return known[1]
        try:
            cost = estimate(spec)
        except GgufError:
            cost = Cost(0, 0)
        self._known[spec.name] = (spec.load_key(), cost)
        return cost

    def _holders(self) -> list[Worker]:
        """Model workers that hold memory: loaded or loading, or unloading still."""
        held = [w for w in self.models.values() if w.state != WorkerState.ERROR and w.alive()]
        return held + [w for w in self._retiring if isinstance(w, Worker) and w.alive()]

    @staticmethod
    def _worker_cost(worker: Worker) -> Cost:
        return worker.measured or worker.estimate

    def _held(self, holders: list[Worker], *specs: ModelRecord) -> int:
        """Bytes the holders hold (and the models of ``specs`` would add): each file's
        weights once, every context."""
        weights: dict[tuple[str, int], int] = {}
        total = 0
        costs = [(w.spec, self._worker_cost(w)) for w in holders]
        costs += [(spec, self.cost(spec)) for spec in specs]
        for s, cost in costs:
            key = (str(Path(s.file).resolve()), s.gpu_layers)
            weights[key] = max(weights.get(key, 0), cost.weights)
            total += cost.context
        return total + sum(weights.values())

    def _make_room(self, spec: ModelRecord) -> None:
        """Unload idle models until ``spec``'s model fits the budget; NoRoom if it does
        not fit yet (``freeing``: models it unloaded are still freeing their memory),
        TooBig if it never can."""
        budget = self.memory_budget
        if not budget:
            return
        need = self.cost(spec)
        if self._held([], spec) > budget:
            raise TooBig(
                f"model {spec.name!r} needs {need.total / MiB:.0f} MiB, more than the "
                f"memory_budget of {budget / MiB:.0f} MiB"
            )
        holders = self._holders()
        first = self._first_in_line()
        # the room the first in line waits for is kept for it
        ahead = [self.state.models[first]] if first is not None and first != spec.name else []
        if self._held(holders, spec, *ahead) <= budget:
            return
        held = ", ".join(
            f"{w.name} ({self._worker_cost(w).total / MiB:.0f} MiB, {self.model_state(w.name)})"
            for w in holders
        )
        message = (
            f"model {spec.name!r} needs {need.total / MiB:.0f} MiB and the memory_budget of "
            f"{budget / MiB:.0f} MiB is held by {held}"
        )
        if ahead:
            raise NoRoom(f"{message}; model {first!r} waits for room first", freeing=False)
        # models already unloading free their memory soon: unload more only if that is
        # not enough
        staying = [w for w in holders if self.models.get(w.name) is w]
        if self._held(staying, spec) > budget:
            on_demand = [w for w in staying if w.spec.load == "on-demand"]
            on_demand.sort(key=lambda w: self.used.get(w.name, 0.0))
            idle = self._fitting(staying, [w for w in on_demand if self._is_idle(w)], spec)
            for w in idle or []:
                log.info("unloading model %s to make room for %s", w.name, spec.name)
                self._retire_model(w.name)
                staying.remove(w)
            # else busy models finish what they have, take nothing new, and unload then:
            # a client's next request would make its model busy again at once
            drain = self._fitting(staying, on_demand, spec) if idle is None else None
            for w in drain or []:
                if w.name not in self.draining:
                    log.info("model %s takes no new requests: it makes room for %s once idle",
                             w.name, spec.name)  # fmt: skip
                    self.draining[w.name] = spec.name
        freeing = self._held([w for w in staying if w.name not in self.draining], spec) <= budget
        raise NoRoom(message, freeing)

    def _fitting(
        self, staying: list[Worker], candidates: list[Worker], spec: ModelRecord
    ) -> list[Worker] | None:
        """The fewest of ``candidates``, first ones first, whose unloading makes room for
        ``spec``'s model; None if all of them do not."""
        for n in range(1, len(candidates) + 1):
            kept = [w for w in staying if w not in candidates[:n]]
            if self._held(kept, spec) <= self.memory_budget:
                return candidates[:n]
        return None

    def memory(self) -> dict[str, int]:
        """Bytes the loaded models hold, and the budget (0: none)."""
        with self._lock:
            return {"held": self._held(self._holders()), "budget": self.memory_budget}

    # kept in step

    def heal(self) -> None:
        """Replace engines whose thread died, with a growing delay if they keep dying;
        unload on-demand models idle past their keep-alive."""
        with self._lock:
            for name, worker in list(self.models.items()):
                spec = self.state.models.get(name)
                if worker.crashed and spec is not None and _due(worker):
                    log.warning("restarting model %s (restart %d)", name, worker.restarts + 1)
                    self._start_model(spec, worker.restarts + 1)
                elif spec is not None and spec.load == "on-demand" and self._idle(name, spec):
                    keep = self.keep.get(name, spec.keep_alive)
                    log.info("unloading model %s: idle for %g s", name, keep)
                    self._retire_model(name)
            for remote in list(self.remotes.values()):
                if remote.crashed and _due(remote):
                    self._start_remote(remote.assistant, remote.restarts + 1)
            self._retiring = [w for w in self._retiring if w.alive()]

    def _is_idle(self, worker: Worker) -> bool:
        """Nothing in flight or queued, and no request just routed to it (between a
        request's routing and its job's submission, the worker looks idle)."""
        if worker.state != WorkerState.ONLINE or worker.busy or worker.queued:
            return False
        claimed = max(self.used.get(worker.name, 0.0), worker.ready_at)  # its waiters' too
        return time.monotonic() - claimed >= CLAIM_GRACE

    def _idle(self, name: str, spec: ModelRecord) -> bool:
        """Idle past its keep-alive (the last request's, else the model's)."""
        keep = self.keep.get(name, float(spec.keep_alive))
        if keep < 0 or not self._is_idle(self.models[name]):
            return False
        return time.monotonic() - self.used.get(name, 0.0) >= keep

    def unloads_at(self, name: str) -> float | None:
        """When (time.monotonic()) an idle on-demand model unloads; None: not planned."""
        spec = self.state.models.get(name)
        keep = self.keep.get(name, float(spec.keep_alive if spec else -1))
        if spec is None or spec.load != "on-demand" or keep < 0 or name not in self.models:
            return None
        return self.used.get(name, 0.0) + keep

    def reconcile(self, state: State, retry_failed: bool = False) -> None:
        """Load ``always`` models, unload models gone offline, changed, or that no online
        assistant runs (and remote assistants' replicas likewise).

        A retired engine refuses new jobs at once and frees its context when
        its in-flight jobs are done; its successor loads alongside. A model
        that failed to load is retried when its record changes, or when asked
        (SIGHUP).
        """
        with self._lock:
            self.state = state
            used = {a.model for a in state.assistants.values() if a.online and not a.remote}
            for name, worker in list(self.models.items()):
                spec = state.models.get(name)
                failed = worker.state == WorkerState.ERROR
                if (
                    spec is None
                    or spec.load == "offline"
                    or name not in used
                    or spec.load_key() != worker.spec.load_key()
                    or (failed and (retry_failed or spec != worker.spec))
                ):
                    self._retire_model(name)
                else:
                    worker.update(spec)
            for name, spec in state.models.items():
                if spec.load == "always" and name in used and name not in self.models:
                    try:
                        self._make_room(spec)
                    except Unavailable as exc:
                        log.warning("%s; loading it anyway, as it is loaded always", exc)
                    log.info("loading model %s (%s)", name, spec.file)
                    self._start_model(spec)
            self._reconcile_remotes(state, retry_failed)
            self._retiring = [w for w in self._retiring if w.alive()]

    def _reconcile_remotes(self, state: State, retry_failed: bool) -> None:
        for name, remote in list(self.remotes.items()):
            wanted = state.assistants.get(name)
            if (
                wanted is None
                or not wanted.online
                or not wanted.remote
                or wanted.load_key() != remote.assistant.load_key()
                or (remote.state == WorkerState.ERROR and retry_failed)
            ):
                self._retiring.append(self.remotes.pop(name))
                self._retiring[-1].stop()
            else:
                remote.assistant = wanted
        for name, wanted in state.assistants.items():
            if wanted.remote and wanted.online and name not in self.remotes:
                log.info("starting assistant %s (%s)", name, ", ".join(wanted.upstream))
                self._start_remote(wanted)

    def _start_model(self, spec: ModelRecord, restarts: int = 0) -> Worker:
        worker = Worker(spec, self.cost(spec), self.saved, self._idle_now)
        self.wanting.pop(spec.name, None)
        for drained, beneficiary in list(self.draining.items()):
            if beneficiary == spec.name:  # room was made otherwise: it may go on
                del self.draining[drained]
        worker.restarts = restarts
        self.models[spec.name] = worker
        self.used.setdefault(spec.name, time.monotonic())
        self.loads[spec.name] += 1
        worker.start()
        return worker

    def _start_remote(self, assistant: Assistant, restarts: int = 0) -> None:
        remote = Remote(assistant, self.root)
        remote.restarts = restarts
        self.remotes[assistant.name] = remote
        remote.start()

    def _retire_model(self, name: str) -> None:
        worker = self.models.pop(name)
        log.info("unloading model %s", name)
        if worker.measured is not None:  # the next load is planned with what this one took
            self._known[name] = (worker.spec.load_key(), worker.measured)
        self.keep.pop(name, None)
        self.draining.pop(name, None)
        if worker.state != WorkerState.ERROR:
            self.unloads[name] += 1
        worker.stop()
        self._retiring.append(worker)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            engines: list[Engine] = [*self.models.values(), *self.remotes.values()]
            engines += self._retiring
            self.models.clear()
            self.remotes.clear()
            self._retiring = []
        for engine in engines:
            engine.stop()
        deadline = time.monotonic() + timeout  # for them all, not each
        for engine in engines:
            engine.join(max(0.0, deadline - time.monotonic()))


def _due(engine: Engine) -> bool:
    """A dead engine's successor starts after a delay that doubles with each restart."""
    delay = min(MAX_RESTART_DELAY, 0.5 * 2.0**engine.restarts)
    return time.monotonic() - engine.ended_at >= delay
