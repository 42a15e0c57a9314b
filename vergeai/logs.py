"""Logging setup: plain text for people, one JSON object per line for log shippers.

Text lines never carry a client's control characters: newlines, NUL, BEL,
bidirectional overrides and the like are escaped, so no client can forge
or hide a log line. JSON lines are escaped by the JSON encoder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO


def escape(text: str, also: str = "") -> str:
    """Non-printable characters (and those in ``also``) as \\x, \\u or \\U escapes."""
    if text.isprintable() and not any(c in text for c in also):
        return text
    out = []
    for ch in text:
        if ch.isprintable() and ch not in also:
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            else:
                out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def log_token(text: str) -> str:
    """A value for a space-separated ``key=value`` log line: no spaces, quotes or ``=``."""
    return escape(text, also=" \"'=\\") or "-"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "text", capture_native: bool = False) -> None:
    """Log to stderr; with capture_native, native code's stderr becomes log lines too."""
    stream = _native_stderr_to_log() if capture_native else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # a line per upstream request and health check: ours say what matters
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def _native_stderr_to_log() -> TextIO:
    """Point file descriptor 2 at a pipe read into the log; return the real stderr.

    llama.cpp prints some errors straight to stderr, quoting client input
    (a grammar it could not parse) with its newlines. Read a line at a time
    and logged, that text is escaped like any other, and JSON logs stay one
    object per line. Python's own sys.stderr keeps writing to the real one.
    """
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = real
    threading.Thread(target=_pump, args=(read_fd,), name="native-stderr", daemon=True).start()
    return real


def _pump(read_fd: int) -> None:
    log = logging.getLogger("vergeai.native")
    with open(read_fd, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.strip():
                log.warning("%s", line)
