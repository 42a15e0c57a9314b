"""The client side of the daemon's admin socket in the state dir; no heavy imports."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

SOCKET = "admin.sock"


def ask(state_dir: Path, command: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """Send one command to a running daemon; None when none answers."""
    path = state_dir / SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(command.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    try:
        reply = json.loads(data)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None
