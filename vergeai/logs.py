"""Logging setup: plain text for people, one JSON object per line for log shippers.

Text lines never carry a client's control characters: newlines, NUL, BEL,
bidirectional overrides and the like are escaped, so no client can forge
or hide a log line. JSON lines are escaped by the JSON encoder.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


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


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
