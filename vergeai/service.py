"""The running server's view of the state dir: a live snapshot plus the worker pool.

The snapshot is refreshed when a state file changes (polled) or on SIGHUP.
A state file broken by hand keeps the last good configuration in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from vergeai.auth import KeyIndex
from vergeai.errors import StateError
from vergeai.runtime.pool import Pool
from vergeai.state.store import State, Store

log = logging.getLogger("vergeai.service")


@dataclass
class Counters:
    requests: int = 0
    in_flight: int = 0
    errors: int = 0


@dataclass
class Service:
    store: Store
    pool: Pool = field(default_factory=Pool)
    state: State = field(default_factory=State)
    keys: KeyIndex = field(default_factory=lambda: KeyIndex(State()))
    counters: Counters = field(default_factory=Counters)
    started: float = field(default_factory=time.time)
    _fingerprint: object = None

    def refresh(self, force: bool = False) -> bool:
        """Reload the state dir if it changed; returns whether anything was applied."""
        fingerprint = self.store.fingerprint()
        if not force and fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        try:
            state = self.store.load()
        except StateError as exc:
            log.error("state dir not reloaded, keeping the last good configuration: %s", exc)
            return False
        self.state = state
        self.keys = KeyIndex(state)
        self.pool.reconcile(state.assistants)
        return True

    async def watch(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh()
            except Exception:
                log.exception("reloading the state dir failed")
