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
from vergeai.room import NoRoom, Room, TooBig
from vergeai.runtime.engine import Engine, WorkerState
from vergeai.runtime.saved import SavedPrefixes
from vergeai.runtime.worker import Worker
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord
from vergeai.state.store import State
from vergeai.upstream.replicas import Remote

log = logging.getLogger("vergeai.pool")


MAX_RESTART_DELAY = 60.0
FAILED_RETRY_DELAY = 30.0  # seconds before a request loads an on-demand model that failed again


class Pool:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root  # the state dir: remote assistants' keys may be in its secrets.toml
        self.models: dict[str, Worker] = {}  # by model name
        self.remotes: dict[str, Remote] = {}  # by assistant name
        self.state = State()  # as last reconciled
        self.used: dict[str, float] = {}  # model name: time.monotonic() of its last request
        self.keep: dict[str, float] = {}  # model name: the last request's keep_alive, if any
        self.load_timeout = 300.0  # seconds a request waits for its model to load
        self.room = Room(self)
        self.loads: Counter[str] = Counter()  # by model: loads since start, and unloads
        self.unloads: Counter[str] = Counter()
        self.saved: SavedPrefixes | None = None  # where unloaded models' prefixes are kept
        self._retiring: list[Engine] = []
        self._lock = threading.Lock()

    def configure(
        self, load_timeout: float, memory_budget: int, memory_wait: float, saved_prefix_mb: int
    ) -> None:
        self.load_timeout = load_timeout
        self.room.budget = memory_budget
        self.room.wait = memory_wait
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
            if spec.name in self.room.draining and worker is not None:
                raise NoRoom(
                    f"model {spec.name!r} is being unloaded to make room for another model; "
                    "it loads again when there is room",
                    freeing=True,
                )
            if spec.load == "on-demand" and self._should_load(worker):
                if self.room.budget:  # in line for room, unless there is room now
                    now = time.monotonic()
                    self.room.wanting.setdefault(spec.name, [now, now])[1] = now
                try:
                    self.room.make_room(spec)
                except TooBig:
                    self.room.wanting.pop(spec.name, None)
                    raise
                if worker is not None:
                    self._retire_model(spec.name)
                log.info("loading model %s on demand", spec.name)
                worker = self._start_model(spec)
            return worker

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
                self.room.make_room(spec)
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

    def stats(self) -> list[dict[str, Any]]:
        """Each engine's figures, a model worker's with the assistants on it."""
        out = []
        for name, worker in sorted(self.models.items()):
            out.append({**worker.stats(), "assistants": self.state.assistants_on(name)})
        return out + [remote.stats() for _, remote in sorted(self.remotes.items())]

    def memory(self) -> dict[str, int]:
        """Bytes the loaded models hold, and the budget (0: none)."""
        with self._lock:
            return {"held": self.room.held(self.room.holders()), "budget": self.room.budget}

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

    def _idle(self, name: str, spec: ModelRecord) -> bool:
        """Idle past its keep-alive (the last request's, else the model's)."""
        keep = self.keep.get(name, float(spec.keep_alive))
        if keep < 0 or not self.room.is_idle(self.models[name]):
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
                        self.room.make_room(spec)
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
        worker = Worker(spec, self.room.cost(spec), self.saved, self.room.idle_now)
        self.room.wanting.pop(spec.name, None)
        for drained, beneficiary in list(self.room.draining.items()):
            if beneficiary == spec.name:  # room was made otherwise: it may go on
                del self.room.draining[drained]
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
            self.room._known[name] = (worker.spec.load_key(), worker.measured)
        self.keep.pop(name, None)
        self.room.draining.pop(name, None)
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


def model_info(pool: Pool, name: str) -> dict[str, Any]:
    """A model's state, memory (estimated before a load, measured after), when it was
    last used and when it unloads if it stays idle (seconds from now)."""
    spec = pool.state.models[name]
    worker = pool.models.get(name)
    now = time.monotonic()
    used = pool.used.get(name)
    unloads_at = pool.unloads_at(name)
    estimated = worker.estimate if worker is not None else pool.room.cost(spec)
    measured = worker.measured if worker is not None else None
    return {
        "state": pool.model_state(name),
        "estimated_bytes": estimated.total,
        "measured_bytes": measured.total if measured else None,
        "last_used_seconds_ago": None if used is None else round(now - used, 1),
        "unloads_in_seconds": (
            None if unloads_at is None else round(max(0.0, unloads_at - now), 1)
        ),
    }
