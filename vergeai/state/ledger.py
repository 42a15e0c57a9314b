"""The usage record: one row per finished API request that named an assistant.

In ``usage.db`` (SQLite, WAL) beside the keys' last-used times. The server
collects rows in memory and writes them off the event loop every half
second, so a crash loses at most the requests of that half second and those
in flight. ``vergeai usage`` reads totals from it; rows older than the
retention (``usage_days``, default 400) are pruned by the server.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sqlite3
from dataclasses import astuple, dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vergeai.state.sqlite import transaction

FILE = "usage.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    at TEXT NOT NULL, user TEXT NOT NULL, key TEXT NOT NULL, assistant TEXT NOT NULL,
    endpoint TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    duration_ms REAL NOT NULL, request_id TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (at);
"""
GROUPS = ("day", "user", "key", "assistant")
TOTALS = (
    "SUM(requests) AS requests, SUM(CASE WHEN status >= 400 THEN requests ELSE 0 END) AS errors, "
    "SUM(prompt_tokens) AS prompt_tokens, "
    "SUM(cached_tokens) AS cached_tokens, SUM(completion_tokens) AS completion_tokens, "
    "SUM(prompt_tokens + completion_tokens) AS total_tokens"
)


@dataclass(frozen=True)
class Record:
    at: str  # ISO 8601, UTC
    user: str
    key: str  # the key's name, never its token
    assistant: str
    endpoint: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    duration_ms: float
    request_id: str
    requests: int = 1  # refused requests of one minute are one row: how many


def _add_requests(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if "requests" not in columns:  # a usage.db from before refusals were counted by the minute
        conn.execute("ALTER TABLE requests ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")


MAX_COUNT = 2**53  # tokens a record may hold: SQLite's integers and JSON's exact ones


def _sane(record: Record) -> Record:
    """Counts within 0..MAX_COUNT and a finite duration: an upstream's wild number
    (10^30 does not fit SQLite; a negative one would credit quotas) is clamped."""

    def count(n: int) -> int:
        return min(max(int(n), 0), MAX_COUNT)

    duration = record.duration_ms if math.isfinite(record.duration_ms) else 0.0
    return replace(
        record,
        status=count(record.status),
        prompt_tokens=count(record.prompt_tokens),
        cached_tokens=count(record.cached_tokens),
        completion_tokens=count(record.completion_tokens),
        duration_ms=min(max(duration, 0.0), 1e12),
        requests=count(record.requests),
    )


def by_day(record: Record, days: dict[str, list[int]]) -> list[Record]:
    """A request's record, split where it ran past midnight UTC: ``days`` holds the
    prompt and completion tokens its limits counted to each day, and what it used
    before a midnight is a row of that day (its last instant, counting no request),
    so the record and the daily quotas seeded from it agree."""
    out = []
    rest = record
    for day in sorted(days)[:-1]:
        p, c = min(days[day][0], rest.prompt_tokens), min(days[day][1], rest.completion_tokens)
        cached = min(rest.cached_tokens, p)
        at = f"{day}T23:59:59.999999+00:00"
        out.append(replace(rest, at=at, prompt_tokens=p, cached_tokens=cached,
                           completion_tokens=c, duration_ms=0.0, requests=0))  # fmt: skip
        rest = replace(
            rest,
            prompt_tokens=rest.prompt_tokens - p,
            cached_tokens=rest.cached_tokens - cached,
            completion_tokens=rest.completion_tokens - c,
        )
    return [*out, rest]


@dataclass(frozen=True)
class Filter:
    user: str | None = None
    key: str | None = None
    assistant: str | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive


class Ledger:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / FILE

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path, SCHEMA, _add_requests)

    def write(self, records: list[Record]) -> None:
        """Write the records; numbers out of range are clamped, so no record (and no
        batch) is lost to another's bad value."""
        if not records:
            return
        marks = ", ".join("?" * len(fields(Record)))
        with self._db() as db:
            db.executemany(
                f"INSERT INTO requests VALUES ({marks})", (astuple(_sane(r)) for r in records)
            )

    def forget_user(self, user: str, anonymise: bool) -> int:
        """A deleted user's records: renamed to a name no user can have (their counts
        stay in the totals), or deleted; returns how many."""
        if not self.path.exists():
            return 0
        with self._db() as db:
            if not anonymise:
                return int(db.execute("DELETE FROM requests WHERE user=?", (user,)).rowcount)
            gone = f"(deleted {secrets.token_hex(4)})"
            sql = "UPDATE requests SET user=?, key='-' WHERE user=?"
            return int(db.execute(sql, (gone, user)).rowcount)

    def prune(self, days: int) -> int:
        cutoff = (datetime.now(UTC) - timedelta(days=days)).isoformat()
        with self._db() as db:
            return int(db.execute("DELETE FROM requests WHERE at < ?", (cutoff,)).rowcount)

    def tokens_since(self, since: datetime) -> dict[tuple[str, str], int]:
        """Prompt and completion tokens per (user, key) since a time: what quotas count."""
        if not self.path.exists():
            return {}
        sql = (
            "SELECT user, key, SUM(prompt_tokens + completion_tokens) FROM requests "
            "WHERE at >= ? GROUP BY user, key"
        )
        with self._db() as db:
            rows = db.execute(sql, (since.astimezone(UTC).isoformat(),)).fetchall()
        return {(user, key): int(tokens or 0) for user, key, tokens in rows}

    def totals(self, where: Filter, by: str | None = None) -> list[dict[str, Any]]:
        """Sums over the matching requests, one row per group (``day`` is the UTC date)."""
        if not self.path.exists():
            return []
        clauses, args = ["1"], []
        for name in ("user", "key", "assistant"):
            value = getattr(where, name)
            if value is not None:
                clauses.append(f"{name} = ?")
                args.append(value)
        if where.since is not None:
            clauses.append("at >= ?")
            args.append(where.since.astimezone(UTC).isoformat())
        if where.until is not None:
            clauses.append("at < ?")
            args.append(where.until.astimezone(UTC).isoformat())
        group = {"day": "substr(at, 1, 10)", None: "'all'"}.get(by, by)
        if by is not None and by not in GROUPS:
            raise ValueError(f"cannot group by {by!r}")
        sql = (
            f"SELECT {group} AS grp, {TOTALS} FROM requests WHERE {' AND '.join(clauses)} "
            f"GROUP BY grp ORDER BY grp"
        )
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = [dict(row) for row in db.execute(sql, args)]
        out = []
        for row in rows:
            value = row.pop("grp")
            sums = {k: v or 0 for k, v in row.items()}
            out.append({by: value, **sums} if by else sums)
        return out
