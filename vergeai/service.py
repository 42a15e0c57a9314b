"""The running server's view of the state dir: a live snapshot plus the worker pool.

The snapshot is refreshed when a state file changes (polled) or on SIGHUP.
A state file broken by hand keeps the last good configuration in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from vergeai.auth import Caller, KeyIndex
from vergeai.errors import AuthenticationError, StateError
from vergeai.limits import Limits
from vergeai.pool import Pool
from vergeai.state.history import History
from vergeai.state.ledger import Ledger, Record
from vergeai.state.responses import Responses
from vergeai.state.schema import now
from vergeai.state.store import State, Store
from vergeai.state.usage import KeyUsage

MAX_PENDING_RECORDS = 100_000  # usage records kept in memory while the ledger cannot be written
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
    limits: Limits = field(default_factory=Limits)
    started: float = field(default_factory=time.time)
    _fingerprint: object = None
    _used: dict[str, datetime] = field(default_factory=dict)
    _records: list[Record] = field(default_factory=list)  # finished requests, not yet written
    # requests refused before any work, per caller, endpoint, status and minute: the
    # first is written as it comes, the others counted into one row a flush
    _refused: dict[tuple[str, ...], tuple[Record, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pool.root = self.store.root

    def authenticate(self, authorization: str | None) -> Caller:
        try:
            caller = self.keys.authenticate(authorization)
        except AuthenticationError as exc:
            # a key created a moment ago works at once, before the next poll
            if exc.reason != "unknown" or not self.refresh():
                raise
            caller = self.keys.authenticate(authorization)
        self._used[caller.key.hash[:16]] = now()
        return caller

    def record(self, record: Record) -> None:
        """Note a finished request for the usage record. Requests refused before any
        work are the first of each minute and kind, then one row a flush counting the
        rest (a client hammering a limit wrote a row for each, 15,000 in 75 s)."""
        if record.status < 400 or record.prompt_tokens or record.completion_tokens:
            self._records.append(record)
            return
        minute = record.at[:16]  # YYYY-MM-DDTHH:MM
        kind = (record.user, record.key, record.assistant, record.endpoint, str(record.status))
        seen = self._refused.get((*kind, minute))
        if seen is None:
            self._records.append(record)
            self._refused[(*kind, minute)] = (record, 0)
        else:
            self._refused[(*kind, minute)] = (seen[0], seen[1] + 1)

    def flush_records(self) -> None:
        """Write the records, the refused ones counted since the last flush as one row."""
        this_minute = datetime.now(UTC).isoformat()[:16]
        for kind, (first, more) in list(self._refused.items()):
            if more:
                self._records.append(replace(first, requests=more))
                self._refused[kind] = (first, 0)
            if kind[-1] < this_minute:
                del self._refused[kind]
        records, self._records = self._records, []
        if not records:
            return
        try:
            Ledger(self.store.root).write(records)
        except Exception as exc:  # bookkeeping must never take the server down
            # kept for the next flush (a locked or full disk may clear), within a bound
            self._records = (records + self._records)[-MAX_PENDING_RECORDS:]
            log.warning("could not write %d usage records yet: %s", len(records), exc)

    def prune_stores(self, usage_days: int) -> None:
        """Prune what the stores keep past its time: usage records past the retention, and
        stored responses and chat-history sessions past their assistant's (``history_days``),
        or of an assistant or user no longer there."""
        root = self.store.root
        retention = {name: a.history_days for name, a in self.state.assistants.items()}
        users = set(self.state.users)
        pruned = Ledger(root).prune(usage_days)
        gone = Responses(root).prune(retention, users)
        idle = History(root).prune(retention, users)
        if pruned:
            log.info("pruned %d usage records older than %d days", pruned, usage_days)
        if gone:
            log.info("pruned %d stored responses (expired, or their assistant or user gone)", gone)
        if idle:
            log.info("pruned %d chat sessions (idle, or their assistant or user gone)", idle)

    def flush_usage(self) -> None:
        used, self._used = self._used, {}
        try:
            KeyUsage(self.store.root).write(used)
        except Exception as exc:  # bookkeeping must never take the server down
            log.warning("could not record key usage: %s", exc)

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
        self.pool.reconcile(state, retry_failed=force)
        log.info(
            "state dir loaded: %d assistants, %d models, %d users",
            len(state.assistants),
            len(state.models),
            len(state.users),
        )
        return True

    async def watch(self, interval: float = 0.5, usage_every: int = 4) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            try:
                self.refresh()
                self.pool.heal()
                if ticks % usage_every == 0 and self._used:
                    await asyncio.to_thread(self.flush_usage)
                if self._records or self._refused:
                    await asyncio.to_thread(self.flush_records)
            except Exception:
                log.exception("reloading the state dir failed")
