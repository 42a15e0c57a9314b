"""Summaries of what each server did, the side-by-side table, and the JSON record."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from servers import PEERS, VERGEAI
from workload import Conversation, Round, Stream


@dataclass
class ServerResult:
    name: str
    argv: list[str]
    rounds: dict[int, list[Round]] = field(default_factory=dict)
    rss_kib: dict[int, int] = field(default_factory=dict)  # high-water mark after each level
    conversations: list[Conversation] = field(default_factory=list)
    peak_rss_kib: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # who used the CPU in its rounds
    round_cpu: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    conversation_cpu: list[dict[str, Any]] = field(default_factory=list)
    retried: int = 0  # disturbed rounds or conversations that were run again
    error: str | None = None
    log_tail: str | None = None  # the server's last log lines, kept when something failed

    def add_cpu(self, cpu: dict[str, float]) -> None:
        for key, value in cpu.items():
            self.cpu[key] = self.cpu.get(key, 0.0) + value

    def disturbed(self, level: int | None) -> int:
        """Kept rounds (or conversations, for None) that were disturbed all the same."""
        cpus = self.conversation_cpu if level is None else self.round_cpu.get(level, [])
        return sum(bool(c.get("disturbed")) for c in cpus)

    def streams(self, level: int) -> list[Stream]:
        return [s for r in self.rounds.get(level, []) for s in r.streams]


def median(values: Iterable[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def level_summary(result: ServerResult, level: int, max_tokens: int) -> dict[str, Any]:
    rounds = result.rounds.get(level, [])
    streams = result.streams(level)
    wall = sum(r.wall_s for r in rounds)
    mismatched = [
        s for s in streams if s.reported_tokens is not None and s.reported_tokens != s.chunks
    ]
    return {
        "ttft_ms": median(s.ttft_ms for s in streams),
        "decode_tps": median(s.decode_tps for s in streams),
        "total_tps": median(_round_tps(r) for r in rounds),
        "total_tps_pooled": sum(s.tokens for s in streams) / wall if wall > 0 else None,
        "complete": sum(s.complete(max_tokens) for s in streams),
        "streams": len(streams),
        "chunk_count_mismatches": len(mismatched),
        "token_counts_reported": any(s.reported_tokens is not None for s in streams),
        "errors": sorted({s.error for s in streams if s.error})[:5],
        "peak_rss_mib": result.rss_kib[level] / 1024 if level in result.rss_kib else None,
        "round_wall_s": [r.wall_s for r in rounds],
        "round_cpu": result.round_cpu.get(level, []),
        "disturbed_rounds": result.disturbed(level),
    }


def _round_tps(r: Round) -> float | None:
    return sum(s.tokens for s in r.streams) / r.wall_s if r.wall_s > 0 else None


def followup_summary(result: ServerResult) -> dict[str, Any]:
    records = [c.record() for c in result.conversations]
    return {
        "prompt_n": median(r["prompt_n"] for r in records),
        "cache_n": median(r["cache_n"] for r in records),
        "prompt_tokens": median(r["prompt_tokens"] for r in records),
        "followup_ttft_ms": median(r["followup_ttft_ms"] for r in records),
        "disturbed": result.disturbed(None),
        "cpu": result.conversation_cpu,
        "turns": records,
    }


def same_text(result: ServerResult, reference: ServerResult, level: int) -> tuple[int, int]:
    """(streams whose text equals the reference's for the same prompt, streams compared)."""
    ref = {s.prompt: s.text for s in reference.streams(level) if s.error is None}
    pairs = [(s.text, ref[s.prompt]) for s in result.streams(level) if s.prompt in ref]
    return sum(a == b for a, b in pairs), len(pairs)


# the table

ROW_METRICS = (  # (key in the level summary, label, format, lower is better)
    ("ttft_ms", "TTFT median, ms ↓", "{:.0f}", True),
    ("decode_tps", "decode tok/s per stream, median ↑", "{:.1f}", False),
    ("total_tps", "total tok/s ↑", "{:.1f}", False),
    ("peak_rss_mib", "peak RSS so far, MiB ↓", "{:.0f}", True),
)


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def build_table(results: list[ServerResult], summary: dict[str, Any]) -> Table:
    names = [r.name for r in results]
    peers = [n for n in names if n in PEERS]
    table = Table(title="vergeai side by side (ratio = vergeai ÷ peer; ↑ higher is better)")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for peer in peers:
        table.add_column(f"vergeai ÷ {peer}", justify="right")
    for level in summary["levels"]:
        for key, label, fmt, _ in ROW_METRICS:
            values = {n: summary["servers"][n]["levels"][str(level)][key] for n in names}
            cells = [_fmt(values[n], fmt) for n in names]
            ratios = [_ratio(values.get(VERGEAI), values[p]) for p in peers]
            table.add_row(f"c={level} {label}", *cells, *ratios)
        table.add_row(f"c={level} streams complete", *_complete_cells(summary, names, level))
        table.add_row(f"c={level} same text as vergeai", *_same_cells(summary, names, level))
        table.add_section()
    values = {n: summary["servers"][n]["followup"]["prompt_n"] for n in names}
    table.add_row(
        "follow-up turn: prompt tokens evaluated ↓",
        *[_fmt(values[n], "{:.0f}") for n in names],
        *[_ratio(values.get(VERGEAI), values[p]) for p in peers],
    )
    values = {n: summary["servers"][n]["followup"]["followup_ttft_ms"] for n in names}
    table.add_row(
        "follow-up turn: TTFT median, ms ↓",
        *[_fmt(values[n], "{:.0f}") for n in names],
        *[_ratio(values.get(VERGEAI), values[p]) for p in peers],
    )
    table.add_section()
    values = {n: summary["servers"][n]["peak_rss_mib"] for n in names}
    table.add_row(
        "peak RSS, whole run, MiB ↓",
        *[_fmt(values[n], "{:.0f}") for n in names],
        *[_ratio(values.get(VERGEAI), values[p]) for p in peers],
    )
    return table


def _complete_cells(summary: dict[str, Any], names: list[str], level: int) -> list[str]:
    cells = []
    for n in names:
        s = summary["servers"][n]["levels"][str(level)]
        cells.append(f"{s['complete']}/{s['streams']}")
    return cells


def _same_cells(summary: dict[str, Any], names: list[str], level: int) -> list[str]:
    cells = []
    for n in names:
        same = summary["servers"][n]["levels"][str(level)].get("same_text_as_vergeai")
        cells.append("—" if same is None else f"{same[0]}/{same[1]}")
    return cells


def summarize(results: list[ServerResult], levels: list[int], max_tokens: int) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    servers: dict[str, Any] = {}
    for r in results:
        entry: dict[str, Any] = {
            "argv": r.argv,
            "error": r.error,
            "log_tail": r.log_tail,
            "cpu": r.cpu,
            "retried": r.retried,
            "peak_rss_mib": r.peak_rss_kib / 1024,
            "levels": {},
            "followup": followup_summary(r),
        }
        for level in levels:
            s = level_summary(r, level, max_tokens)
            if r.name != VERGEAI and VERGEAI in by_name:
                s["same_text_as_vergeai"] = same_text(r, by_name[VERGEAI], level)
            s["streams_detail"] = [st.record() for st in r.streams(level)]
            entry["levels"][str(level)] = s
        servers[r.name] = entry
    return {"levels": levels, "servers": servers}


def warnings(summary: dict[str, Any], max_tokens: int) -> list[str]:
    """Lines worth a reader's attention: failed servers, errors, short or miscounted streams."""
    out = []
    for name, entry in summary["servers"].items():
        if entry["error"]:
            out.append(f"{name}: {entry['error']}")
        if entry["retried"]:
            out.append(
                f"{name}: {entry['retried']} disturbed round(s) run again (others used the CPU)"
            )
        for level, s in entry["levels"].items():
            if s["disturbed_rounds"]:
                out.append(
                    f"{name} c={level}: {s['disturbed_rounds']} of {len(s['round_cpu'])} round(s) "
                    "kept were disturbed by other processes all the same"
                )
        if entry["followup"]["disturbed"]:
            out.append(f"{name}: {entry['followup']['disturbed']} conversation(s) disturbed")
        for turn in entry["followup"]["turns"]:
            out.extend(
                f"{name} conversation: {t['error']}"
                for t in (turn["first"], turn["second"])
                if t["error"]
            )
        for level, s in entry["levels"].items():
            if s["complete"] < s["streams"]:
                out.append(
                    f"{name} c={level}: {s['streams'] - s['complete']} of {s['streams']} streams "
                    f"did not deliver {max_tokens} tokens with a finish_reason"
                )
            if s["chunk_count_mismatches"]:
                out.append(
                    f"{name} c={level}: {s['chunk_count_mismatches']} streams where content "
                    "chunks != the server's token count"
                )
            out.extend(f"{name} c={level}: {e}" for e in s["errors"])
    return out


def print_report(results: list[ServerResult], summary: dict[str, Any], max_tokens: int) -> None:
    console = Console(width=160)
    console.print(build_table(results, summary))
    for line in warnings(summary, max_tokens):
        console.print(f"[yellow]warning:[/yellow] {line}")
