"""The set of model workers, kept in step with the assistants in the state dir."""

from __future__ import annotations

import logging
import threading

from vergeai.runtime.worker import Worker
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.pool")


class Pool:
    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self._retiring: list[Worker] = []
        self._lock = threading.Lock()

    def get(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def status(self, assistant: Assistant) -> str:
        worker = self.workers.get(assistant.name)
        if worker is None:
            return "offline"
        return worker.status

    def reconcile(self, assistants: dict[str, Assistant]) -> None:
        """Start workers for online assistants, retire those gone offline or changed.

        A retired worker refuses new jobs at once and frees its context when
        its in-flight jobs are done; its successor loads alongside.
        """
        with self._lock:
            for name, worker in list(self.workers.items()):
                wanted = assistants.get(name)
                if (
                    wanted is None
                    or not wanted.online
                    or wanted.load_key() != worker.assistant.load_key()
                    or (worker.status == "error" and wanted != worker.assistant)
                ):
                    self._retire(name)
                else:
                    worker.assistant = wanted
            for name, wanted in assistants.items():
                if wanted.online and name not in self.workers:
                    log.info("loading assistant %s (%s)", name, wanted.model)
                    worker = Worker(wanted)
                    self.workers[name] = worker
                    worker.start()
            self._retiring = [w for w in self._retiring if w.thread.is_alive()]

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
        for worker in workers:
            worker.join(timeout)
