"""Chat-history sessions in SQLite (WAL): per (user, assistant, session id) turns.

A turn is what one successful call added: its user message(s) and the
assistant's answer. Opened per call, so any thread may use it.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vergeai.state.sqlite import transaction

FILE = "history.db"
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}\Z")  # \Z: no trailing newline

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    user TEXT NOT NULL, assistant TEXT NOT NULL, session TEXT NOT NULL,
    last_used TEXT NOT NULL, next_turn INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, assistant, session)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL, assistant TEXT NOT NULL, session TEXT NOT NULL,
    turn INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, tokens INTEGER NOT NULL,
    extra TEXT  -- JSON: a message's tool_calls, tool_call_id and name, when it has them
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (user, assistant, session, turn);
"""

Message = dict[str, Any]  # role, content, and tool_calls, tool_call_id, name where given
Turn = list[Message]
EXTRA = ("tool_calls", "tool_call_id", "name")


@dataclass(frozen=True)
class SessionKey:
    user: str
    assistant: str
    session: str


class History:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / FILE

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path, SCHEMA, _add_extra)

    def turns(self, key: SessionKey, max_idle_days: int) -> list[Turn]:
        """The session's stored turns, oldest first; an idle-expired session is emptied."""
        with self._db() as db:
            row = db.execute(
                "SELECT last_used FROM sessions WHERE user=? AND assistant=? AND session=?",
                (key.user, key.assistant, key.session),
            ).fetchone()
            if row is None:
                return []
            if datetime.fromisoformat(row[0]) < _now() - timedelta(days=max_idle_days):
                _delete(db, "user=? AND assistant=? AND session=?", [*_k(key)])
                return []
            rows = db.execute(
                "SELECT turn, role, content, extra FROM messages "
                "WHERE user=? AND assistant=? AND session=? ORDER BY turn, id",
                _k(key),
            ).fetchall()
        turns: dict[int, Turn] = {}
        for turn, role, content, extra in rows:
            message = {"role": role, "content": content, **(json.loads(extra) if extra else {})}
            turns.setdefault(turn, []).append(message)
        return list(turns.values())

    def append(self, key: SessionKey, turn: list[tuple[Message, int]], max_turns: int) -> None:
        """Store one turn (messages with their token counts); keep the newest max_turns."""
        with self._db() as db:
            db.execute(
                "INSERT INTO sessions (user, assistant, session, last_used, next_turn) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT DO UPDATE SET last_used = excluded.last_used",
                (*_k(key), _now().isoformat()),
            )
            (number,) = db.execute(
                "UPDATE sessions SET next_turn = next_turn + 1 "
                "WHERE user=? AND assistant=? AND session=? RETURNING next_turn - 1",
                _k(key),
            ).fetchone()
            db.executemany(
                "INSERT INTO messages "
                "(user, assistant, session, turn, role, content, tokens, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*_k(key), number, m["role"], m["content"], n, _extra(m)) for m, n in turn],
            )
            db.execute(
                "DELETE FROM messages WHERE user=? AND assistant=? AND session=? AND turn <= ?",
                (*_k(key), number - max_turns),
            )

    def sessions(self, assistant: str, user: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        where, args = _where(assistant, user, None, table="s.")
        with self._db() as db:
            rows = db.execute(
                "SELECT s.session, s.user, s.last_used, COUNT(DISTINCT m.turn), "
                "COALESCE(SUM(m.tokens), 0) FROM sessions s LEFT JOIN messages m "
                "ON m.user = s.user AND m.assistant = s.assistant AND m.session = s.session "
                f"WHERE {where} "
                "GROUP BY s.user, s.session ORDER BY s.last_used DESC",
                args,
            ).fetchall()
        return [
            {"id": r[0], "user": r[1], "last_used": r[2], "turns": r[3], "tokens": r[4]}
            for r in rows
        ]

    def forget_user(self, user: str) -> int:
        """Delete every session of a user (on every assistant); returns how many."""
        if not self.path.exists():
            return 0
        with self._db() as db:
            return _delete(db, "user=?", [user])

    def clear(self, assistant: str, user: str | None = None, session: str | None = None) -> int:
        """Delete matching sessions; returns how many there were."""
        if not self.path.exists():
            return 0
        where, args = _where(assistant, user, session)
        with self._db() as db:
            return _delete(db, where, args)


def _add_extra(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "extra" not in columns:  # a history.db from before tool calls
        conn.execute("ALTER TABLE messages ADD COLUMN extra TEXT")


def _extra(message: Message) -> str | None:
    extra = {k: message[k] for k in EXTRA if k in message}
    return json.dumps(extra, ensure_ascii=False) if extra else None


def _now() -> datetime:
    return datetime.now(UTC)


def _k(key: SessionKey) -> tuple[str, str, str]:
    return (key.user, key.assistant, key.session)


def _where(
    assistant: str, user: str | None, session: str | None, table: str = ""
) -> tuple[str, list[str]]:
    clauses, args = [f"{table}assistant=?"], [assistant]
    if user is not None:
        clauses.append(f"{table}user=?")
        args.append(user)
    if session is not None:
        clauses.append(f"{table}session=?")
        args.append(session)
    return " AND ".join(clauses), args


def _delete(db: sqlite3.Connection, where: str, args: list[str]) -> int:
    count = int(db.execute(f"DELETE FROM sessions WHERE {where}", args).rowcount)
    db.execute(f"DELETE FROM messages WHERE {where}", args)
    return count
