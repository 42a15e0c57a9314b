"""The local admin channel: a unix socket in the state dir (mode 0600).

Access to the state dir is the credential; no API key is involved. A client
sends one command line (``workers``) and reads one JSON document back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vergeai import __version__
from vergeai.errors import VergeError
from vergeai.pool import model_info
from vergeai.runtime.memory import resident_bytes
from vergeai.service import Service
from vergeai.state.admin_socket import SOCKET, ask

log = logging.getLogger("vergeai.admin")


def workers_snapshot(service: Service, listen: list[str]) -> dict[str, Any]:
    c = service.counters
    return {
        "helper": {
            "pid": os.getpid(),
            "version": __version__,
            "listen": listen,
            "uptime_seconds": round(time.time() - service.started, 1),
            "requests_served": c.requests,
            "in_flight": c.in_flight,
            "errors": c.errors,
            "rss_bytes": resident_bytes(),
            "requests_limited": service.limits.refused,
        },
        "workers": service.pool.stats(),
        "models": {name: service.pool.model_state(name) for name in sorted(service.state.models)},
        "model_info": {
            name: model_info(service.pool, name) for name in sorted(service.state.models)
        },
        "memory": service.pool.memory(),
        "assistants": {
            name: service.pool.state_of(a) for name, a in sorted(service.state.assistants.items())
        },
    }


def load_or_unload(service: Service, verb: str, name: str) -> dict[str, Any]:
    """`vergeai model load|unload NAME`: the model's state after, or the error."""
    if name not in service.state.models:
        return {"error": f"no model named {name[:100]!r}"}
    try:
        state = service.pool.load(name) if verb == "load" else service.pool.unload(name)
    except ValueError as exc:
        return {"error": str(exc)}
    except VergeError as exc:  # it does not fit the memory budget
        return {"error": exc.message}
    return {"ok": True, "state": state}


async def start_admin_server(
    service: Service, state_dir: Path, listen: list[str]
) -> asyncio.AbstractServer | None:
    path = state_dir / SOCKET

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            command = line.decode("utf-8", "replace").strip()
            if command == "workers":
                reply: dict[str, Any] = workers_snapshot(service, listen)
            elif command == "reload":
                service.refresh(force=True)
                reply = {"ok": True}
            elif command.startswith(("load ", "unload ")):
                reply = load_or_unload(service, *command.split(" ", 1))
            else:
                reply = {"error": f"unknown command {command[:40]!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    if ask(state_dir, "workers", timeout=2.0) is not None:
        raise AdminSocketBusy(f"another vergeai serve is already running on {state_dir}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path=str(path))
    except OSError as exc:
        log.error("admin socket %s unavailable (vergeai workers will not see us): %s", path, exc)
        return None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


class AdminSocketBusy(RuntimeError):
    pass


def remove_socket(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / SOCKET).unlink()
