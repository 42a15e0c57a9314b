"""The memory budget of the loaded models: what each costs, who waits for room, and
which models make it.

A model loads when its cost (measured at its last load, else estimated from
its GGUF; see :mod:`vergeai.runtime.memory`) fits beside what the loaded
models hold, weights of one file counted once. To make room, the least
recently used idle on-demand models are unloaded; a model with a request in
flight or queued, and an ``always`` one, never are. Requests that wait for
room form a line: the first in line has its room kept for it, and when no
idle model can make room, busy on-demand models are drained (they finish
what they have, take nothing new, and unload once idle), since a client's
next request would make its model busy again at once. Every method runs
under the pool's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from vergeai.errors import Unavailable
from vergeai.gguf import GgufError
from vergeai.runtime.engine import Engine, WorkerState
from vergeai.runtime.memory import Cost, estimate
from vergeai.runtime.worker import Worker
from vergeai.state.models import ModelRecord
from vergeai.state.store import State

log = logging.getLogger("vergeai.pool")

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


class Pool(Protocol):
    """What the room reads and does of the pool (:class:`vergeai.pool.Pool`)."""

    models: dict[str, Worker]
    used: dict[str, float]
    state: State
    _retiring: list[Engine]
    _lock: threading.Lock

    def model_state(self, name: str) -> str: ...
    def _retire_model(self, name: str) -> None: ...
    def _start_model(self, spec: ModelRecord, restarts: int = 0) -> Worker: ...


def worker_cost(worker: Worker) -> Cost:
    return worker.measured or worker.estimate


class Room:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.budget = 0  # bytes the loaded models may hold; 0: no budget
        self.wait = 60.0  # seconds a request waits for room in the budget
        self._known: dict[str, tuple[tuple[Any, ...], Cost]] = {}  # model: (load key, cost)
        # models requests wait room for: [since, last asked]; the first in line makes room
        self.wanting: dict[str, list[float]] = {}
        self.draining: dict[str, str] = {}  # model: whom it makes room for once idle

    def first_in_line(self) -> str | None:
        """The model whose requests have waited longest for room (those that stopped
        asking are forgotten, and what was drained for them)."""
        now = time.monotonic()
        for name, (_, last) in list(self.wanting.items()):
            if (
                now - last > WANT_TIMEOUT
                or name in self.pool.models
                or name not in self.pool.state.models
            ):
                del self.wanting[name]
        for drained, beneficiary in list(self.draining.items()):
            if beneficiary not in self.wanting:
                del self.draining[drained]
        return min(self.wanting, key=lambda n: self.wanting[n][0], default=None)

    def is_idle(self, worker: Worker) -> bool:
        """Nothing in flight or queued, and no request just routed to it (between a
        request's routing and its job's submission, the worker looks idle)."""
        if worker.state != WorkerState.ONLINE or worker.busy or worker.queued:
            return False
        claimed = max(self.pool.used.get(worker.name, 0.0), worker.ready_at)  # its waiters' too
        return time.monotonic() - claimed >= CLAIM_GRACE

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

    def holders(self) -> list[Worker]:
        """Model workers that hold memory: loaded or loading, or unloading still."""
        held = [w for w in self.pool.models.values() if w.state != WorkerState.ERROR and w.alive()]
        return held + [w for w in self.pool._retiring if isinstance(w, Worker) and w.alive()]

    def held(self, holders: list[Worker], *specs: ModelRecord) -> int:
        """Bytes the holders hold (and the models of ``specs`` would add): each file's
        weights once, every context."""
        weights: dict[tuple[str, int], int] = {}
        total = 0
        costs = [(w.spec, worker_cost(w)) for w in holders]
        costs += [(spec, self.cost(spec)) for spec in specs]
        for s, cost in costs:
            key = (str(Path(s.file).resolve()), s.gpu_layers)
            weights[key] = max(weights.get(key, 0), cost.weights)
            total += cost.context
        return total + sum(weights.values())

    def make_room(self, spec: ModelRecord) -> None:
        """Unload idle models until ``spec``'s model fits the budget; NoRoom if it does
        not fit yet (``freeing``: models it unloaded are still freeing their memory),
        TooBig if it never can."""
        budget = self.budget
        if not budget:
            return
        need = self.cost(spec)
        if self.held([], spec) > budget:
            raise TooBig(
                f"model {spec.name!r} needs {need.total / MiB:.0f} MiB, more than the "
                f"memory_budget of {budget / MiB:.0f} MiB"
            )
        holders = self.holders()
        first = self.first_in_line()
        # the room the first in line waits for is kept for it
        ahead = [self.pool.state.models[first]] if first is not None and first != spec.name else []
        if self.held(holders, spec, *ahead) <= budget:
            return
        held = ", ".join(
            f"{w.name} ({worker_cost(w).total / MiB:.0f} MiB, {self.pool.model_state(w.name)})"
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
        staying = [w for w in holders if self.pool.models.get(w.name) is w]
        if self.held(staying, spec) > budget:
            on_demand = [w for w in staying if w.spec.load == "on-demand"]
            on_demand.sort(key=lambda w: self.pool.used.get(w.name, 0.0))
            idle = self.fitting(staying, [w for w in on_demand if self.is_idle(w)], spec)
            for w in idle or []:
                log.info("unloading model %s to make room for %s", w.name, spec.name)
                self.pool._retire_model(w.name)
                staying.remove(w)
            # else busy models finish what they have, take nothing new, and unload then:
            # a client's next request would make its model busy again at once
            drain = self.fitting(staying, on_demand, spec) if idle is None else None
            for w in drain or []:
                if w.name not in self.draining:
                    log.info("model %s takes no new requests: it makes room for %s once idle",
                             w.name, spec.name)  # fmt: skip
                    self.draining[w.name] = spec.name
        freeing = self.held([w for w in staying if w.name not in self.draining], spec) <= budget
        raise NoRoom(message, freeing)

    def fitting(
        self, staying: list[Worker], candidates: list[Worker], spec: ModelRecord
    ) -> list[Worker] | None:
        """The fewest of ``candidates``, first ones first, whose unloading makes room for
        ``spec``'s model; None if all of them do not."""
        for n in range(1, len(candidates) + 1):
            kept = [w for w in staying if w not in candidates[:n]]
            if self.held(kept, spec) <= self.budget:
                return candidates[:n]
        return None

    def idle_now(self, worker: Worker) -> None:
        """A model worker has just become idle (its thread calls this): the model first
        in line for room gets it now, before the next request makes this one busy again
        (between a client's back-to-back requests it is idle for a moment)."""
        with self.pool._lock:
            if self.pool.models.get(worker.name) is not worker:
                return
            first = self.first_in_line()
            if first is None:
                return
            spec = self.pool.state.models[first]
            try:
                self.make_room(spec)
            except Unavailable:
                return  # what it unloaded frees its memory; its request loads it then
            log.info("loading model %s on demand", first)
            self.pool._start_model(spec)
