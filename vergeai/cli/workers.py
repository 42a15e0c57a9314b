"""vergeai workers: the AI-Helper worker and the model workers, asked over the admin socket."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vergeai.cli.common import (
    JsonOption,
    StateDirOption,
    err,
    new_table,
    out,
    print_json,
    show,
    store_for,
)
from vergeai.state.admin_socket import ask

NOT_RUNNING = 3


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def _budget(memory: dict[str, int]) -> str:
    held = _bytes(memory.get("held")) if memory.get("held") else "0"
    return f"{held} of {_bytes(memory['budget'])}" if memory.get("budget") else f"{held}, no budget"


def _limited(refused: dict[str, int]) -> str:
    """429s by limit: "requests 3, concurrency 1", or 0."""
    return ", ".join(f"{reason} {n}" for reason, n in refused.items() if n) or "0"


def memory_text(info: dict[str, Any]) -> str:
    """Estimated before the load, measured after: "312.4 MiB (estimated 340.2 MiB)"."""
    estimated = _bytes(info.get("estimated_bytes"))
    if info.get("measured_bytes") is None:
        return f"{estimated} estimated"
    return f"{_bytes(info['measured_bytes'])} (estimated {estimated})"


def _when(info: dict[str, Any]) -> tuple[str, str]:
    used, unloads = info.get("last_used_seconds_ago"), info.get("unloads_in_seconds")
    return (
        "-" if used is None else f"{_duration(used)} ago",
        "kept loaded" if unloads is None else f"in {_duration(unloads)} if idle",
    )


def _worker_fields(w: dict[str, Any], info: dict[str, Any]) -> list[tuple[str, str]]:
    state = w["state"] if not w["error"] else f"{w['state']}: {w['error']}"
    return [
        ("assistants", ", ".join(w["assistants"]) or "-"),
        ("file", w["model_path"]),
        ("state", state),
        ("context", f"{w['ctx']} tokens x {w['parallel']} slots"),
        ("CPU threads", str(w["threads"])),
        ("GPU layers", str(w["gpu_layers"])),
        ("memory", memory_text(info)),
        ("model weights", _bytes(w["model_bytes"])),
        ("KV cache", _bytes(w["kv_cache_bytes"])),
        ("last used", _when(info)[0]),
        ("unloads", _when(info)[1]),
        ("requests served", str(w["requests_served"])),
        ("busy slots", f"{w['busy_slots']}/{w['parallel']}"),
        ("queue depth", str(w["queue_depth"])),
        ("tokens generated", str(w["tokens_generated"])),
        ("last prompt tok/s", f"{w['last_prompt_per_second']:.1f}"),
        ("last decode tok/s", f"{w['last_predicted_per_second']:.1f}"),
        ("uptime", _duration(w["uptime_seconds"])),
        ("restarts", str(w["restarts"])),
    ]


def render(snapshot: dict[str, Any]) -> Group:
    """Fields down, workers across: fits a terminal for the usual handful of assistants."""
    h = snapshot["helper"]
    helper = new_table("AI-Helper worker", show_header=False)
    helper.add_column("field", style="bold")
    helper.add_column("value", overflow="fold")
    for field, value in [
        ("pid", str(h["pid"])),
        ("version", h["version"]),
        ("listening on", " ".join(h["listen"])),
        ("uptime", _duration(h["uptime_seconds"])),
        ("requests served", str(h["requests_served"])),
        ("in flight", str(h["in_flight"])),
        ("errors", str(h["errors"])),
        ("refused for limits", _limited(h.get("requests_limited", {}))),
        ("process RSS", _bytes(h["rss_bytes"])),
        ("models' memory", _budget(snapshot.get("memory", {}))),
    ]:
        helper.add_row(field, value)
    parts: list[Any] = [helper]
    if not snapshot["workers"]:
        parts.append(Text("no model workers: no model is loaded"))
    local = [w for w in snapshot["workers"] if not w.get("remote")]
    remote = [w for w in snapshot["workers"] if w.get("remote")]
    if local:
        heads = [w["model"] for w in local]
        infos = snapshot.get("model_info", {})
        columns = [_worker_fields(w, infos.get(w["model"], {})) for w in local]
        parts.append(_fields_across("model workers", "model", heads, columns))
    shown = {w["model"] for w in local}
    idle = {n: s for n, s in snapshot.get("models", {}).items() if n not in shown}
    if idle:
        parts.append(Text("not loaded: " + ", ".join(f"{n} ({s})" for n, s in idle.items())))
    for w in remote:
        title = f"remote model worker {w['assistant']} ({w['model']})"
        heads = [r["url"] for r in w["replicas"]]
        columns = [_replica_fields(r) for r in w["replicas"]]
        parts.append(_fields_across(title, "upstream", heads, columns))
    return Group(*parts)


def _fields_across(
    title: str, corner: str, heads: list[str], columns: list[list[tuple[str, str]]]
) -> Table:
    """Fields down, one column per worker (or upstream), each a list of (field, value)."""
    table = new_table(title)
    table.add_column(corner, style="bold")
    for head in heads:
        table.add_column(head, overflow="fold")
    for i, (field, _) in enumerate(columns[0]):
        table.add_row(field, *(c[i][1] for c in columns))
    return table


def _replica_fields(r: dict[str, Any]) -> list[tuple[str, str]]:
    latency = r["last_latency_ms"]
    return [
        ("state", r["state"]),
        ("in flight", str(r["in_flight"])),
        ("requests", str(r["requests"])),
        ("failures", str(r["failures"])),
        ("last latency", "-" if latency is None else f"{latency:.0f} ms"),
        ("last error", r["last_error"] or "-"),
    ]


def workers(
    json_: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, max=3600, help="Seconds between refreshes with --watch.")
    ] = 1.0,
    state_dir: StateDirOption = None,
) -> None:
    """Show the AI-Helper worker (the server) and one model worker per loaded model."""
    root = store_for(state_dir).root
    snapshot = ask(root, "workers")
    if snapshot is None:
        err.print("AI-Helper worker is not running", markup=False)
        err.print(f"start it with: vergeai serve --state-dir {root}", markup=False)
        raise typer.Exit(NOT_RUNNING)
    if json_:
        print_json(snapshot)
        return
    if not watch:
        show(render(snapshot))
        return
    try:
        with Live(render(snapshot), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                snapshot = ask(root, "workers")
                if snapshot is None:
                    err.print("AI-Helper worker stopped", markup=False)
                    raise typer.Exit(NOT_RUNNING)
                live.update(render(snapshot), refresh=True)
    except KeyboardInterrupt:
        pass
