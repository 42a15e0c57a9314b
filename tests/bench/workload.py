"""The workload: streamed chat completions at fixed length, and a two-turn conversation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

STORY = (
    "Write a long, detailed story about a lighthouse keeper who finds an old map hidden in "
    "the wall of the lamp room. Describe the sea, the weather over several days, the sounds "
    "of the lighthouse at night, the people of the nearby fishing village, and what the "
    "keeper decides to do with the map. Use plain language and many concrete details."
)
FOLLOW_UP = "Thank you. Now list three questions a reader might ask about that story."


@dataclass(frozen=True)
class Workload:
    max_tokens: int
    banned: tuple[int, ...]  # end-of-generation token ids, banned so every stream runs to length

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "model": "bench",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "logit_bias": {str(t): -100 for t in self.banned},
        }


@dataclass(frozen=True)
class Endpoint:
    root: str
    headers: dict[str, str]


@dataclass
class Stream:
    """What the client saw of one streamed completion (times from time.perf_counter)."""

    prompt: str
    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    t_end: float | None = None
    chunks: int = 0  # SSE chunks that carried content
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reported_tokens(self) -> int | None:
        """Generated tokens as the server counts them (timings, else usage), if it says."""
        if self.timings and "predicted_n" in self.timings:
            return int(self.timings["predicted_n"])
        if self.usage and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"])
        return None

    @property
    def tokens(self) -> int:
        reported = self.reported_tokens
        return self.chunks if reported is None else reported

    def complete(self, max_tokens: int) -> bool:
        return self.error is None and self.finish_reason is not None and self.tokens == max_tokens

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_send) * 1000.0

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first over the time from the first to the last content chunk."""
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return (self.tokens - 1) / (self.t_last - self.t_first)

    def record(self) -> dict[str, Any]:
        return {
            "ttft_ms": self.ttft_ms,
            "decode_tps": self.decode_tps,
            "chunks": self.chunks,
            "reported_tokens": self.reported_tokens,
            "finish_reason": self.finish_reason,
            "duration_ms": None if self.t_end is None else (self.t_end - self.t_send) * 1000.0,
            "timings": self.timings,
            "usage": self.usage,
            "error": self.error,
            "text": self.text,
        }


def client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


async def stream_chat(
    http: httpx.AsyncClient, ep: Endpoint, work: Workload, messages: list[dict[str, str]]
) -> Stream:
    s = Stream(prompt=messages[-1]["content"], t_send=time.perf_counter())
    try:
        url = ep.root + "/v1/chat/completions"
        async with http.stream("POST", url, json=work.body(messages), headers=ep.headers) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            else:
                await _read_events(r, s)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a malformed JSON event
        s.error = f"{type(exc).__name__}: {exc}"
    s.t_end = time.perf_counter()
    if s.error is None and s.finish_reason is None:
        s.error = "stream ended without a finish_reason"
    return s


async def _read_events(r: httpx.Response, s: Stream) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, ": ping" comments
        data = line[5:].strip()
        if data == "[DONE]":
            return
        _take_chunk(json.loads(data), s, time.perf_counter())


def _take_chunk(obj: dict[str, Any], s: Stream, now: float) -> None:
    if "error" in obj:
        s.error = f"error event: {obj['error']}"
    if obj.get("usage"):
        s.usage = obj["usage"]
    if obj.get("timings"):
        s.timings = obj["timings"]
    for choice in obj.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            s.chunks += 1
            s.parts.append(content)
            s.t_first = s.t_first or now
            s.t_last = now
        if choice.get("finish_reason"):
            s.finish_reason = choice["finish_reason"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def story_prompt(tag: str) -> str:
    """Unique from its first word, so no server can reuse another request's cache."""
    return f"{hashlib.sha256(tag.encode()).hexdigest()[:8]}: {STORY}"


@dataclass
class Round:
    concurrency: int
    wall_s: float
    streams: list[Stream]


async def run_round(ep: Endpoint, work: Workload, concurrency: int, tag: str) -> Round:
    """`concurrency` simultaneous streams; wall time from the first send to the last byte."""
    async with client(concurrency) as http:
        t0 = time.perf_counter()
        jobs = [
            stream_chat(http, ep, work, user(story_prompt(f"{tag}.{i}")))
            for i in range(concurrency)
        ]
        streams = list(await asyncio.gather(*jobs))
    wall = max((s.t_end or t0) for s in streams) - t0
    return Round(concurrency, wall, streams)


@dataclass
class Conversation:
    first: Stream
    second: Stream

    @property
    def prompt_n(self) -> int | None:
        """Prompt tokens the server evaluated for the follow-up turn, if it reports it."""
        t = self.second.timings
        return int(t["prompt_n"]) if t and "prompt_n" in t else None

    def record(self) -> dict[str, Any]:
        t = self.second.timings or {}
        return {
            "prompt_n": self.prompt_n,
            "cache_n": t.get("cache_n"),
            "prompt_tokens": (self.second.usage or {}).get("prompt_tokens"),
            "followup_ttft_ms": self.second.ttft_ms,
            "first": self.first.record(),
            "second": self.second.record(),
        }


async def run_conversation(ep: Endpoint, work: Workload, tag: str) -> Conversation:
    """Turn 2 re-sends turn 1 and its answer plus a new question."""
    async with client(1) as http:
        history = user(story_prompt(f"conversation {tag}"))
        first = await stream_chat(http, ep, work, history)
        history = [*history, {"role": "assistant", "content": first.text}, *user(FOLLOW_UP)]
        second = await stream_chat(http, ep, work, history)
    return Conversation(first, second)


def end_of_generation_tokens(model_path: str) -> tuple[int, ...]:
    """Every token id llama.cpp treats as end of generation (Gemma 3: 1, 106, 212)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with _stderr_silenced():  # llama.cpp's loader talks on fd 2 whatever the log level
        model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {model_path}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        return tuple(t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t))
    finally:
        llama_cpp.llama_model_free(model)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
