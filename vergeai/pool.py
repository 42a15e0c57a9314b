"""The set of model workers, kept in step with the assistants in the state dir."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from vergeai.runtime.engine import Engine, WorkerState
from vergeai.runtime.worker import Worker
from vergeai.state.assistants import Assistant
from vergeai.upstream.replicas import Remote

log = logging.getLogger("vergeai.pool")


MAX_RESTART_DELAY = 60.0


class Pool:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root  # the state dir: remote assistants' keys may be in its secrets.toml
        self.workers: dict[str, Engine] = {}
        self.restarts: dict[str, int] = {}
        self._retiring: list[Engine] = []
        self._lock = threading.Lock()

    def get(self, name: str) -> Engine | None:
        return self.workers.get(name)

    def state_of(self, assistant: Assistant) -> WorkerState:
        worker = self.workers.get(assistant.name)
        return WorkerState.OFFLINE if worker is None else worker.state

    def error(self, name: str) -> str:
        worker = self.workers.get(name)
        if worker is None:
            return "not loaded"
        return worker.problem or str(self.state_of(worker.assistant))

    def heal(self) -> None:
        """Replace workers whose thread died, with a growing delay if they keep dying."""
        with self._lock:
            for name, worker in list(self.workers.items()):
                if not worker.crashed:
                    continue
                count = self.restarts.get(name, 0)
                delay = min(MAX_RESTART_DELAY, 0.5 * 2**count)
                if time.monotonic() - worker.ended_at < delay:
                    continue
                log.warning("restarting assistant %s (restart %d)", name, count + 1)
                self.restarts[name] = count + 1
                self._start(worker.assistant)

    def reconcile(self, assistants: dict[str, Assistant], retry_failed: bool = False) -> None:
        """Start workers for online assistants, retire those gone offline or changed.

        A retired worker refuses new jobs at once and frees its context when
        its in-flight jobs are done; its successor loads alongside. A worker
        that failed to load is retried when its assistant changes, or when
        asked (SIGHUP).
        """
        with self._lock:
            for name, worker in list(self.workers.items()):
                wanted = assistants.get(name)
                if (
                    wanted is None
                    or not wanted.online
                    or wanted.load_key() != worker.assistant.load_key()
                    or (
                        worker.state == WorkerState.ERROR
                        and (retry_failed or wanted != worker.assistant)
                    )
                ):
                    self._retire(name)
                else:
                    worker.assistant = wanted
            for name, wanted in assistants.items():
                if wanted.online and name not in self.workers:
                    where = ", ".join(wanted.upstream) if wanted.remote else wanted.model
                    log.info("loading assistant %s (%s)", name, where)
                    self.restarts.pop(name, None)
                    self._start(wanted)
            self._retiring = [w for w in self._retiring if w.alive()]

    def _start(self, assistant: Assistant) -> None:
        worker: Engine = Remote(assistant, self.root) if assistant.remote else Worker(assistant)
        worker.restarts = self.restarts.get(assistant.name, 0)
        self.workers[assistant.name] = worker
        worker.start()

    def _retire(self, name: str) -> None:
        worker = self.workers.pop(name)
        log.info("unloading assistant %s", name)
        worker.stop()
        self._retiring.append(worker)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            workers = list(self.workers.values()) + self._retiring
            self.workers.clear()
            self._retiring = []
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + timeout  # for them all, not each
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
