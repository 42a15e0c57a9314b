"""The state dir's SQLite files: created 0600, WAL, their schema applied, one transaction."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def transaction(
    path: Path, schema: str, upgrade: Callable[[sqlite3.Connection], None] | None = None
) -> Iterator[sqlite3.Connection]:
    """A connection inside one transaction, closed afterwards; ``upgrade`` migrates old files."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    conn = sqlite3.connect(path, timeout=10.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(schema)
        if upgrade is not None:
            upgrade(conn)
        with conn:
            yield conn
    finally:
        conn.close()
