"""When each API key was last used, written by the server, read by `key list`.

Kept apart from keys.toml (SQLite, WAL) so that serving requests never
rewrites the file the CLI edits. Keys are identified by the first 16 hex
digits of their hash.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from vergeai.errors import StateError

FILE = "usage.db"


class KeyUsage:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / FILE

    def _connect(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self.path, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS last_used (key TEXT PRIMARY KEY, at TEXT)")
        return conn

    def read(self) -> dict[str, datetime]:
        if not self.path.exists():
            return {}
        try:
            with contextlib.closing(self._connect()) as conn:
                rows = conn.execute("SELECT key, at FROM last_used").fetchall()
            return {key: datetime.fromisoformat(at) for key, at in rows}
        except (OSError, sqlite3.Error, TypeError, ValueError) as exc:
            raise StateError(f"{self.path}: cannot read key usage: {exc}") from exc

    def write(self, used: dict[str, datetime]) -> None:
        if not used:
            return
        with contextlib.closing(self._connect()) as conn, conn:
            conn.executemany(
                "INSERT INTO last_used (key, at) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET at = excluded.at",
                [(k, v.astimezone(UTC).isoformat()) for k, v in used.items()],
            )
