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
PER_USER = 256 * 1024 * 1024  # characters one user's sessions may hold
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}\Z")  # \Z: no trailing newline

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    user TEXT NOT NULL, assistant TEXT NOT NULL, session TEXT NOT NULL,
    last_used TEXT NOT NULL, next_turn INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,  -- characters of its messages' content and extra
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
    def __init__(self, root: Path, per_user: int = PER_USER) -> None:
        self.path = Path(root) / FILE
        self.per_user = per_user  # characters; a user's least recently used sessions go past it

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path, SCHEMA, _upgrade)

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
        """Store one turn (messages with their token counts); keep the newest max_turns.
        While the user's sessions hold more than ``per_user``, the least recently used
        go, then this session's oldest turns (its newest stays)."""
        rows = [(*_k(key), m["role"], m["content"], n, _extra(m)) for m, n in turn]
        added = sum(len(content) + len(extra or "") for *_, content, _, extra in rows)
        with self._db() as db:
            db.execute(
                "INSERT INTO sessions (user, assistant, session, last_used, next_turn) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT DO UPDATE SET last_used = excluded.last_used",
                (*_k(key), _now().isoformat()),
            )
            (number,) = db.execute(
                "UPDATE sessions SET next_turn = next_turn + 1, size = size + ? "
                "WHERE user=? AND assistant=? AND session=? RETURNING next_turn - 1",
                (added, *_k(key)),
            ).fetchone()
            db.executemany(
                "INSERT INTO messages "
                "(user, assistant, session, role, content, tokens, extra, turn) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, number) for row in rows],
            )
            _drop_turns(db, key, number - max_turns)
            self._hold(db, key, number)

    def _hold(self, db: sqlite3.Connection, key: SessionKey, newest: int) -> None:
        """Keep the user's sessions within ``per_user`` characters."""
        sql = "SELECT SUM(size) FROM sessions WHERE user=?"
        (total,) = db.execute(sql, (key.user,)).fetchone()
        if total <= self.per_user:
            return
        others = db.execute(
            "SELECT assistant, session, size FROM sessions WHERE user=? "
            "AND NOT (assistant=? AND session=?) ORDER BY last_used",
            _k(key),
        ).fetchall()
        for assistant, session, size in others:
            if total <= self.per_user:
                return
            _delete(db, "user=? AND assistant=? AND session=?", [key.user, assistant, session])
            total -= size
        turns = db.execute(
            "SELECT DISTINCT turn FROM messages "
            "WHERE user=? AND assistant=? AND session=? AND turn < ? ORDER BY turn",
            (*_k(key), newest),
        ).fetchall()
        for (turn,) in turns:
            if total <= self.per_user:
                return
            total -= _drop_turns(db, key, turn)

    def prune(self, max_idle_days: dict[str, int], users: set[str]) -> int:
        """Delete sessions idle past their assistant's ``history_days`` and those of an
        assistant or a user no longer there; returns how many."""
        if not self.path.exists():
            return 0
        gone = 0
        with self._db() as db:
            for column, names in (("assistant", set(max_idle_days)), ("user", users)):
                marks = ", ".join("?" * len(names))
                gone += _delete(db, f"{column} NOT IN ({marks})", sorted(names))
            for assistant, days in max_idle_days.items():
                cutoff = (_now() - timedelta(days=days)).isoformat()
                sql = "DELETE FROM sessions WHERE assistant=? AND last_used < ?"
                gone += int(db.execute(sql, (assistant, cutoff)).rowcount)
            db.execute(
                "DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE "
                "s.user = messages.user AND s.assistant = messages.assistant "
                "AND s.session = messages.session)"
            )
        return gone

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


def _upgrade(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "extra" not in columns:  # a history.db from before tool calls
        conn.execute("ALTER TABLE messages ADD COLUMN extra TEXT")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
    if "size" not in columns:  # from before sessions' sizes were kept
        with conn:
            conn.execute("ALTER TABLE sessions ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            conn.execute(
                "UPDATE sessions SET size = (SELECT COALESCE(SUM(length(m.content) + "
                "COALESCE(length(m.extra), 0)), 0) FROM messages m WHERE m.user = sessions.user "
                "AND m.assistant = sessions.assistant AND m.session = sessions.session)"
            )


def _drop_turns(db: sqlite3.Connection, key: SessionKey, upto: int) -> int:
    """Delete the session's turns numbered up to ``upto``; returns the characters freed."""
    where = "user=? AND assistant=? AND session=? AND turn <= ?"
    args = (*_k(key), upto)
    sql = "SELECT COALESCE(SUM(length(content) + COALESCE(length(extra), 0)), 0) FROM messages"
    (size,) = db.execute(f"{sql} WHERE {where}", args).fetchone()
    if size:
        db.execute(f"DELETE FROM messages WHERE {where}", args)
        db.execute(
            "UPDATE sessions SET size = size - ? WHERE user=? AND assistant=? AND session=?",
            (size, *_k(key)),
        )
    return int(size)


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
