"""Stored Responses-API responses in SQLite (WAL), per user: the response, its conversation
and its input items.

The conversation (every message up to and including the response's output,
as chat messages) is what ``previous_response_id`` continues from, so a
follow-up's prompt starts with exactly the tokens the last one ended with
and the slot's cached prefix is reused. A response is kept while its
assistant's chat-history retention (``history_days``) allows.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vergeai.state.sqlite import transaction

MAX_STORED = 1024 * 1024  # characters of one stored response and its conversation
PER_USER = 256 * 1024 * 1024  # characters one user's stored responses may hold

FILE = "responses.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, assistant TEXT NOT NULL, created TEXT NOT NULL,
    response TEXT NOT NULL, conversation TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    input TEXT NOT NULL DEFAULT '[]'
);
"""


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages, the response's output last
    input: list[dict[str, Any]]  # the request's input items, as input_items lists them


def _upgrade(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
    if "size" not in columns:  # a responses.db from before sizes were kept
        with conn:
            conn.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE responses SET size = length(response) + length(conversation)")
    if "input" not in columns:  # from before input items were kept: they list none
        with conn:
            conn.execute("ALTER TABLE responses ADD COLUMN input TEXT NOT NULL DEFAULT '[]'")
    conn.execute("CREATE INDEX IF NOT EXISTS responses_by_user ON responses (user, created)")


class Responses:
    def __init__(self, root: Path, per_user: int = PER_USER) -> None:
        self.path = Path(root) / FILE
        self.per_user = per_user  # characters; a user's oldest responses go past it

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path, SCHEMA, _upgrade)

    def put(
        self,
        user: str,
        assistant: str,
        response: dict[str, Any],
        conversation: list[dict[str, Any]],
        items: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Store a response; False (nothing stored) past :data:`MAX_STORED` characters.
        The user's oldest responses are deleted while they hold more than ``per_user``."""
        kept, turns, given = json.dumps(response), json.dumps(conversation), json.dumps(items or [])
        size = len(kept) + len(turns) + len(given)
        if size > min(MAX_STORED, self.per_user):
            return False
        created = datetime.now(UTC).isoformat()
        with self._db() as db:
            db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (response["id"], user, assistant, created, kept, turns, size, given),
            )
            (total,) = db.execute(
                "SELECT SUM(size) FROM responses WHERE user=?", (user,)
            ).fetchone()
            oldest = db.execute(
                "SELECT id, size FROM responses WHERE user=? AND id != ? ORDER BY created",
                (user, response["id"]),
            )
            gone = []
            for old, old_size in oldest:
                if total <= self.per_user:
                    break
                gone.append((old,))
                total -= old_size
            db.executemany("DELETE FROM responses WHERE id=?", gone)
        return True

    def get(self, user: str, response_id: str, max_days: dict[str, int]) -> Stored | None:
        """The user's response, its conversation and input; None if there is none (or it expired).

        ``max_days`` is each assistant's retention; a response of an assistant
        no longer there is gone too.
        """
        with self._db() as db:
            row = db.execute(
                "SELECT assistant, created, response, conversation, input FROM responses "
                "WHERE id=? AND user=?",
                (response_id, user),
            ).fetchone()
            if row is None:
                return None
            assistant, created, response, conversation, given = row
            days = max_days.get(assistant)
            if days is None or datetime.fromisoformat(created) < _now() - timedelta(days=days):
                db.execute("DELETE FROM responses WHERE id=?", (response_id,))
                return None
        return Stored(json.loads(response), json.loads(conversation), json.loads(given))

    def prune(self, max_days: dict[str, int], users: set[str]) -> int:
        """Delete what has expired (``max_days``: each assistant's retention) and what
        belongs to an assistant or a user no longer there; returns how many."""
        if not self.path.exists():
            return 0
        gone = 0
        with self._db() as db:
            for column, names in (("assistant", set(max_days)), ("user", users)):
                marks = ", ".join("?" * len(names))
                sql = f"DELETE FROM responses WHERE {column} NOT IN ({marks})"
                gone += int(db.execute(sql, sorted(names)).rowcount)
            for assistant, days in max_days.items():
                cutoff = (_now() - timedelta(days=days)).isoformat()
                sql = "DELETE FROM responses WHERE assistant=? AND created < ?"
                gone += int(db.execute(sql, (assistant, cutoff)).rowcount)
        return gone

    def forget_user(self, user: str) -> int:
        """Delete every stored response of a user; returns how many."""
        if not self.path.exists():
            return 0
        with self._db() as db:
            return int(db.execute("DELETE FROM responses WHERE user=?", (user,)).rowcount)

    def delete(self, user: str, response_id: str) -> bool:
        with self._db() as db:
            cursor = db.execute("DELETE FROM responses WHERE id=? AND user=?", (response_id, user))
            return bool(cursor.rowcount)


def _now() -> datetime:
    return datetime.now(UTC)
