"""What an attempt has read, and the upstream's numbers held to what the request could use.

An upstream is not trusted with counts: its answer is cut at the request's
max_tokens, and the token counts it reports (which go into limits, quotas and
the usage record) are clamped to what the request could have used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vergeai.runtime.job import Delta, FinishReason, Task, Timings
from vergeai.runtime.toolcalls import CallDelta
from vergeai.upstream.replicas import Remote

log = logging.getLogger("vergeai.upstream")

# An answer is held to the request's max_tokens whatever the upstream sends: at most
# that many pieces (an upstream streams about a token a piece), and that many times
# this many characters, for an upstream that sends its text in a few large pieces.
CHARS_PER_TOKEN = 32
MAX_PROMPT = 100_000_000  # prompt tokens an upstream may report for one request


@dataclass
class Progress:
    """What an attempt has read and passed on so far."""

    n: int
    held: list[tuple[int, Delta]] = field(default_factory=list)  # kept back for a whole answer
    finish: dict[int, FinishReason] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    chunks: int = 0  # pieces read: the completion tokens if the upstream gives no usage
    pieces: dict[int, int] = field(default_factory=dict)  # per choice
    chars: dict[int, int] = field(default_factory=dict)  # per choice
    cut: bool = False  # a choice ran past max_tokens and was ended here

    @property
    def passed(self) -> bool:
        """Something went to the client: no retry any more."""
        return self.chunks > len(self.held)

    @property
    def complete(self) -> bool:
        """Every choice has ended: nothing more is read."""
        return len(self.finish) >= self.n


def within(
    max_tokens: int,
    progress: Progress,
    index: int,
    text: str,
    reasoning: str,
    calls: tuple[CallDelta, ...],
) -> tuple[str, str, tuple[CallDelta, ...]]:
    """A choice's new output, cut where it passes max_tokens (the choice then ends)."""
    if not (text or reasoning or calls):
        return text, reasoning, calls
    pieces = progress.pieces[index] = progress.pieces.get(index, 0) + 1
    room = max_tokens * CHARS_PER_TOKEN - progress.chars.get(index, 0)
    size = len(text) + len(reasoning) + sum(len(c.arguments) for c in calls)
    progress.chars[index] = progress.chars.get(index, 0) + size
    if pieces > max_tokens:
        text, reasoning, calls = "", "", ()
    elif size > room:
        reasoning = reasoning[:room]
        text = text[: room - len(reasoning)]
        calls = ()
    else:
        return text, reasoning, calls
    progress.finish[index] = "length"
    progress.cut = True
    return text, reasoning, calls


def text_of(value: Any) -> str:
    """A JSON field that should be text: itself, or "" for anything else."""
    return value if isinstance(value, str) else ""


def token_count(value: Any, fallback: int, most: int, name: str, remote: Remote) -> int:
    """An upstream's token count, within 0..most (a number out of it is logged)."""
    count = _int(value, fallback)
    if 0 <= count <= most:
        return count
    log.warning("assistant %s: the upstream reported %s %s; counted as %d",
                remote.name, name, str(count)[:40], min(max(count, 0), most))  # fmt: skip
    return min(max(count, 0), most)


def _int(value: Any, fallback: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else fallback


def call_deltas(value: Any) -> tuple[CallDelta, ...]:
    """A delta's tool_calls; items of the wrong shape are skipped."""
    if not isinstance(value, list):
        return ()
    calls = []
    for item in value:
        if not isinstance(item, dict):
            continue
        function = item.get("function") or {}
        calls.append(
            CallDelta(
                index=_int(item.get("index"), 0),
                arguments=text_of(function.get("arguments")),
                id=item.get("id") if isinstance(item.get("id"), str) else None,
                name=function.get("name") if isinstance(function.get("name"), str) else None,
            )
        )
    return tuple(calls)


def answer_timings(job: Task, progress: Progress, prompt: int, completion: int) -> Timings:
    """The upstream's timings when it sends them (llama-server, vergeai), else measured here."""
    t = progress.timings or {}
    end = time.perf_counter()
    first = job.t_first or end
    cached = ((progress.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    cache_n = _int(t.get("cache_n"), _int(cached, 0))
    return Timings(
        cache_n=cache_n,
        prompt_n=_int(t.get("prompt_n"), max(0, prompt - cache_n)),
        prompt_ms=_float(t.get("prompt_ms"), (first - job.t_start) * 1000.0),
        predicted_n=_int(t.get("predicted_n"), completion),
        predicted_ms=_float(t.get("predicted_ms"), (end - first) * 1000.0),
        draft_n=_int(t.get("draft_n"), 0),
        draft_n_accepted=_int(t.get("draft_n_accepted"), 0),
    )


def _float(value: Any, fallback: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return fallback
