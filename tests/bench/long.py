"""Where real traffic is: long prompts under load, shared prefixes, long conversations.

vergeai against llama-server on the same model, threads, slots and context
per slot (vergeai ``--ctx C --parallel N``, llama-server ``-c C*N -np N``,
its defaults otherwise), interleaved workload by workload:

- ``long``: ~2,000-token unique prompts, 64 tokens out, at c=1 and c=4;
- ``mixed``: 3 streams decoding while a ~2,000-token request arrives every
  few seconds; inter-token latency (p50/p99) of the decoding streams;
- ``conversation``: 8-turn conversations; vergeai keeps them in chat-history
  sessions (``X-Session-ID``, only the new message sent), llama-server is
  sent the whole message list each turn;
- ``system``: a ~1,000-token system prompt (vergeai's assistant setting,
  llama-server in every request), 16 users' short questions at c=4;
- ``system-long``: the same system prompt, two users' 600-token answers (past
  a sliding window), then six short questions one at a time;
- ``repeat``: two short prompts sent alternately at c=1;
- ``copy``: a ~300-token passage to rewrite with one change, 128 tokens out,
  at c=1 and c=4 (where speculation pays), and ``normal``: a short prompt
  for a story, 128 tokens out, at c=1 (where it must not cost).

The demo model copies its prompt and repeats itself on several of those, which
flatters speculation. These workloads give it nothing to copy (see texts.py):

- ``unique``: 1,500 different English words in random order (~1,900 tokens),
  64 tokens out, at c=1, 4 and 8: time to the first and the last token,
  total tok/s and p99 inter-token latency;
- ``prose``: the same on ~1,500 words of real prose (~2,100 tokens);
- ``system-unique``: the ``system`` workload with questions of unique words;
- ``copy-prose``: the ``copy`` workload on three prose texts other than the
  passage (compare with ``--llama-server-ngram``).

By default vergeai runs twice, with its n-gram speculation and with
``--speculate off`` (``--speculation on|off`` for one), beside llama-server;
``--llama-server-ngram`` adds llama-server with ``--spec-type ngram-simple``.

    python tests/bench/long.py --llama-server PATH [--workloads long,mixed] [--json out.json]

Every stream bans end-of-generation tokens, so it runs to its max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from run import DEFAULT_BUILD_SCRIPT, demo_model
from servers import (
    MODEL_NAME,
    Server,
    Settings,
    build_llama_server,
    checkout_env,
    free_port,
    llama_server,
    vergeai_cli,
)
from texts import copy_prompt, prose, unique_words
from workload import STORY, end_of_generation_tokens

WORDS = [
    "river",
    "stone",
    "lantern",
    "harbor",
    "winter",
    "market",
    "signal",
    "garden",
    "copper",
    "thread",
    "window",
    "orchard",
    "engine",
    "letter",
    "bridge",
    "meadow",
    "candle",
    "valley",
    "whistle",
    "ladder",
    "compass",
    "blanket",
    "station",
    "quiet",
    "silver",
    "morning",
    "pocket",
    "island",
    "thunder",
    "kettle",
    "anchor",
    "feather",
    "violin",
    "basket",
    "mirror",
    "tunnel",
]
WORKLOADS = (
    "long", "unique", "prose", "mixed", "conversation", "system", "system-unique",
    "system-long", "repeat", "copy", "copy-prose", "normal",
)  # fmt: skip
PASSAGE = (
    "The harbor town woke slowly on winter mornings. Fishermen walked down to the boats "
    "before the sun rose, carrying nets and lanterns, and the baker on the corner opened "
    "his shutters to let the smell of bread into the street. Children ran along the sea "
    "wall on their way to school, and the old lighthouse keeper climbed the tower to put "
    "out the lamp. By nine o'clock the market square was full: farmers sold apples and "
    "cheese, a woman mended umbrellas under the clock, and the postman stopped at every "
    "door with letters from the city. In the afternoon the wind turned, the boats came "
    "back with their catch, and the gulls followed them into the harbor, crying over the "
    "water. When evening came the keeper climbed the tower again, lit the lamp, and "
    "watched its beam sweep across the dark sea until the last boat was safely home."
)
COPY = (
    f"{PASSAGE}\n\nRewrite the passage above exactly as it is, word for word, except that "
    "the baker becomes a butcher."
)


def passage(tag: str, words: int) -> str:
    """Unique from its first word on; ordinary words, about 1.3 tokens each."""
    rng = random.Random(tag)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{tag}: {body}. Summarize the text above in one sentence."


@dataclass
class Stream:
    t_send: float
    times: list[float] = field(default_factory=list)  # each content chunk's arrival
    text: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t_send if self.times else float("nan")

    @property
    def decode_tps(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


@dataclass
class Target:
    name: str
    server: Server
    model: Callable[[str], str]  # workload's assistant -> the request's model
    sessions: bool  # chat history kept by the server
    system_in_server: bool  # the long system prompt is the assistant's
    # each of the system workload's users' own headers (its API key), where it has users
    users: list[dict[str, str]] = field(default_factory=list)


class Client:
    def __init__(self, target: Target, banned: tuple[int, ...], temperature: float = 0.0) -> None:
        self.target = target
        self.banned = banned
        self.temperature = temperature
        # no keep-alive: a server that closes idle connections would fail the next request
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=0),
        )

    async def stream(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        assistant: str = "bench",
        headers: dict[str, str] | None = None,
    ) -> Stream:
        body = {
            "model": self.target.model(assistant),
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.temperature,
            "seed": 1234,  # each server's sampled answers are the same run after run
            "max_tokens": max_tokens,
            "logit_bias": {str(t): -100 for t in self.banned},
        }
        s = Stream(time.perf_counter())
        url = self.target.server.root + "/v1/chat/completions"
        all_headers = {**self.target.server.headers, **(headers or {})}
        try:
            async with self.http.stream("POST", url, json=body, headers=all_headers) as r:
                if r.status_code != 200:
                    s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return s
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    s.timings = event.get("timings") or s.timings
                    s.usage = event.get("usage") or s.usage
                    for choice in event.get("choices") or []:
                        if content := (choice.get("delta") or {}).get("content"):
                            s.times.append(time.perf_counter())
                            s.text += content
        except httpx.HTTPError as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        if s.error is None and len(s.times) == 0:
            s.error = "no content"
        return s


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def errors(streams: list[Stream]) -> list[str]:
    return [s.error for s in streams if s.error]


async def long_prompts(
    c: Client, make: Callable[[int, int], str], levels: tuple[int, ...]
) -> dict[str, Any]:
    """At each concurrency level, that many long prompts at once, 64 tokens out each."""
    out: dict[str, Any] = {}
    for n in levels:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(c.stream([user(make(n, i))], 64) for i in range(n)))
        wall = max(s.times[-1] if s.times else t0 for s in streams) - t0
        out[f"c{n}"] = {
            "total_tps": sum(len(s.times) for s in streams) / wall,
            "decode_tps": statistics.mean(s.decode_tps for s in streams),
            "ttft_s": statistics.mean(s.ttft for s in streams),
            "done_s": statistics.mean(s.times[-1] - s.t_send for s in streams if s.times),
            "itl_p99_ms": pct([g for s in streams for g in s.gaps()], 0.99) * 1000,
            "prompt_tokens": statistics.mean(s.usage.get("prompt_tokens", 0) for s in streams),
            **drafts(list(streams)),
            "errors": errors(list(streams)),
        }
    return out


def drafts(streams: list[Stream]) -> dict[str, float]:
    """Draft tokens checked per stream, and the share kept (where the server reports them)."""
    n = sum(s.timings.get("draft_n", 0) for s in streams)
    kept = sum(s.timings.get("draft_n_accepted", 0) for s in streams)
    return {"drafted": n / len(streams), "kept": kept / n} if n else {}


async def w_long(c: Client, tag: str) -> dict[str, Any]:
    return await long_prompts(c, lambda n, i: passage(f"{tag}-long-{n}-{i}", 1500), (1, 4))


async def w_unique(c: Client, tag: str) -> dict[str, Any]:
    return await long_prompts(c, lambda n, i: unique_words(f"{tag}-{n}-{i}", 1500), (1, 4, 8))


async def w_prose(c: Client, tag: str) -> dict[str, Any]:
    def make(n: int, i: int) -> str:
        return f"({tag}-{n}-{i}) {prose(i, 1500)}\n\nSummarize the text above in one sentence."

    return await long_prompts(c, make, (1, 4, 8))


async def w_mixed(c: Client, tag: str) -> dict[str, Any]:
    """3 streams of 200 tokens from short prompts; a long prompt every 3 s meanwhile."""
    t0 = time.perf_counter()
    decoding = [
        asyncio.ensure_future(c.stream([user(passage(f"{tag}-mixed-{i}", 20))], 200))
        for i in range(3)
    ]
    arrivals = []
    while not all(d.done() for d in decoding):
        await asyncio.sleep(3.0)
        if all(d.done() for d in decoding):
            break
        prompt = passage(f"{tag}-mixed-long-{len(arrivals)}", 1500)
        arrivals.append(asyncio.ensure_future(c.stream([user(prompt)], 16)))
    streams = [await d for d in decoding]
    longs = [await a for a in arrivals]
    wall = max(s.times[-1] for s in streams + longs if s.times) - t0
    gaps = [g for s in streams for g in s.gaps()]
    return {
        "itl_p50_ms": pct(gaps, 0.5) * 1000,
        "itl_p99_ms": pct(gaps, 0.99) * 1000,
        "itl_max_ms": max(gaps) * 1000 if gaps else float("nan"),
        "decode_tps": statistics.mean(s.decode_tps for s in streams),
        "total_tps": sum(len(s.times) for s in streams + longs) / wall,
        "long_ttft_s": statistics.mean(s.ttft for s in longs) if longs else float("nan"),
        "long_requests": len(longs),
        "errors": errors(streams + longs),
    }


async def w_conversation(c: Client, tag: str) -> dict[str, Any]:
    """8 turns; each question ~100 tokens, each answer 64 tokens."""
    history: list[dict[str, str]] = []
    session = {"X-Session-ID": f"{tag}-conv"} if c.target.sessions else {}
    turns = []
    for turn in range(8):
        question = [user(passage(f"{tag}-conv-{turn}", 80))]
        messages = question if c.target.sessions else [*history, *question]
        s = await c.stream(messages, 64, "chat", session)
        turns.append(s)
        history += [*question, {"role": "assistant", "content": s.text}]
    later = turns[1:]
    return {
        "ttft_ms_later_turns": statistics.mean(s.ttft for s in later) * 1000,
        "ttft_ms_last_turn": later[-1].ttft * 1000,
        "prompt_n_later_turns": statistics.mean(s.timings.get("prompt_n", 0) for s in later),
        "decode_tps": statistics.mean(s.decode_tps for s in turns),
        "errors": errors(turns),
    }


SYSTEM = passage("system prompt of the support assistant", 750)


async def w_system(c: Client, tag: str, unique: bool = False) -> dict[str, Any]:
    """16 users' questions at c=4 to an assistant with a ~1,000-token system prompt (on
    vergeai, each with its own user's key). What they share is the system prompt: each
    question starts with its user (the round's tag, ~28 tokens, would be a prefix that
    different users never share, and that vergeai does not share between them).
    ``unique``: each question is 40 words it has alone, which no answer can copy."""
    system = [] if c.target.system_in_server else [{"role": "system", "content": SYSTEM}]
    keys = c.target.users or [{}]

    def question(i: int) -> str:
        if unique:
            return f"user {i}: {unique_words(f'{tag}-q{i}', 40)}"
        return f"user {i} ({tag}): what should I do about my order number {i}?"

    queue = [(user(question(i)), keys[i % len(keys)]) for i in range(16)]
    streams: list[Stream] = []

    async def worker() -> None:
        while queue:
            question, headers = queue.pop(0)
            streams.append(await c.stream([*system, question], 32, "sys", headers))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(4)))
    wall = max(s.times[-1] for s in streams if s.times) - t0
    return {
        "ttft_ms": statistics.mean(s.ttft for s in streams) * 1000,
        "total_tps": sum(len(s.times) for s in streams) / wall,
        "cache_n": statistics.mean(s.timings.get("cache_n", 0) for s in streams),
        "prompt_n": statistics.mean(s.timings.get("prompt_n", 0) for s in streams),
        "errors": errors(streams),
    }


async def w_system_unique(c: Client, tag: str) -> dict[str, Any]:
    return await w_system(c, tag, unique=True)


async def w_system_long(c: Client, tag: str) -> dict[str, Any]:
    """The system prompt again after answers longer than a sliding window: two users
    get 600-token answers, then six users ask short questions, one at a time."""
    system = [] if c.target.system_in_server else [{"role": "system", "content": SYSTEM}]
    long = [await c.stream([*system, user(f"{tag} user {i}: tell me a very long story.")], 600,
                           "sys") for i in range(2)]  # fmt: skip
    short = [await c.stream([*system, user(f"{tag} user {i}: what is my order status?")], 16,
                            "sys") for i in range(2, 8)]  # fmt: skip
    return {
        "ttft_ms": statistics.mean(s.ttft for s in short) * 1000,
        "cache_n": statistics.mean(s.timings.get("cache_n", 0) for s in short),
        "errors": errors([*long, *short]),
    }


async def w_repeat(c: Client, tag: str) -> dict[str, Any]:
    prompts = [user(f"{tag} first question: what is a harbor?"),
               user(f"{tag} second question: what is an orchard?")]  # fmt: skip
    streams = [await c.stream([prompts[i % 2]], 16) for i in range(10)]
    later = streams[2:]
    return {
        "ttft_ms": statistics.mean(s.ttft for s in later) * 1000,
        "prompt_n": statistics.mean(s.timings.get("prompt_n", 0) for s in later),
        "errors": errors(streams),
    }


async def w_copy(c: Client, tag: str) -> dict[str, Any]:
    return await copies(c, lambda i: f"({tag} {i}) {COPY}")


async def w_copy_prose(c: Client, tag: str) -> dict[str, Any]:
    """Three texts that are not the passage, each at c=1 and c=4."""
    out: dict[str, Any] = {}
    for text in range(3):

        def make(i: int, text: int = text) -> str:
            return copy_prompt(text, f"{tag} {i}")

        out[f"text{text}"] = await copies(c, make)
    return out


async def copies(c: Client, make: Callable[[int], str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (1, 4):
        t0 = time.perf_counter()
        prompts = [make(i) for i in range(n)]
        streams = await asyncio.gather(*(c.stream([user(p)], 128) for p in prompts))
        wall = max(s.times[-1] if s.times else t0 for s in streams) - t0
        out[f"c{n}"] = {
            "total_tps": sum(len(s.times) for s in streams) / wall,
            "decode_tps": statistics.mean(s.decode_tps for s in streams),
            "ttft_ms": statistics.mean(s.ttft for s in streams) * 1000,
            "accepted": statistics.mean(s.timings.get("draft_n_accepted", 0) for s in streams),
            "errors": errors(list(streams)),
        }
    return out


async def w_normal(c: Client, tag: str) -> dict[str, Any]:
    streams = [await c.stream([user(f"{tag} {i}: {STORY}")], 128) for i in range(2)]
    return {
        "decode_tps": statistics.mean(s.decode_tps for s in streams),
        "ttft_ms": statistics.mean(s.ttft for s in streams) * 1000,
        "accepted": statistics.mean(s.timings.get("draft_n_accepted", 0) for s in streams),
        "errors": errors(streams),
    }


RUNNERS: dict[str, Callable[[Client, str], Awaitable[dict[str, Any]]]] = {
    "long": w_long, "unique": w_unique, "prose": w_prose, "mixed": w_mixed,
    "conversation": w_conversation, "system": w_system, "system-unique": w_system_unique,
    "system-long": w_system_long, "repeat": w_repeat, "copy": w_copy,
    "copy-prose": w_copy_prose, "normal": w_normal,
}  # fmt: skip


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def make_vergeai(
    s: Settings, extra: list[str], name: str = "vergeai", tree: Path | None = None
) -> Target:
    """vergeai, from this checkout or from ``tree`` (another one)."""
    state = s.work_dir / f"{name}-long-state"

    def cli(*args: str) -> str:
        return vergeai_cli(state, *args, tree=tree)

    cli("user", "create", "bench", "--role", "admin")
    token = cli("key", "create", "--user", "bench", "--name", "bench").strip()
    common = ["--model", s.model, "--chat-format", "gemma", "--threads", str(s.threads),
              "--ctx", str(s.ctx), "--parallel", str(s.slots), *extra]  # fmt: skip
    cli("assistant", "create", MODEL_NAME, *common)
    cli("assistant", "create", "chat", *common, "--chat-history", "--history-turns", "100")
    cli("assistant", "create", "sys", *common, "--system-prompt", SYSTEM)
    port = free_port()
    argv = [sys.executable, "-m", "vergeai", "serve", "--port", str(port), "--state-dir",
            str(state)]  # fmt: skip
    server = Server(name, argv, port, s.work_dir / f"{name}-long.log", "/health",
                    {"Authorization": f"Bearer {token}"}, tree, checkout_env(tree))  # fmt: skip
    users = []
    for i in range(16):
        cli("user", "create", f"user{i}")
        key = cli("key", "create", "--user", f"user{i}", "--name", "k").strip()
        users.append({"Authorization": f"Bearer {key}"})
    return Target(name, server, lambda a: a, True, True, users)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-server", help="llama-server binary (default: build one)")
    p.add_argument("--llama-server-args", default="", help="extra llama-server flags")
    p.add_argument(
        "--vergeai-args", default="", help="extra assistant settings, e.g. --speculate off"
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of every stream (at 0 the demo model loops, which speculation "
        "copies; 0.8 gives answers it cannot copy)",
    )
    p.add_argument("--skip-llama-server", action="store_true")
    p.add_argument(
        "--speculation",
        choices=("both", "on", "off"),
        default="both",
        help="vergeai with its n-gram speculation, with --speculate off, or both (default)",
    )
    p.add_argument(
        "--llama-server-ngram",
        action="store_true",
        help="also llama-server with --spec-type ngram-simple (for the copy workloads)",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="also vergeai from this checkout (e.g. a git worktree of the commit before a "
        "change), as vergeai-base, in the same run",
    )
    p.add_argument("--json", type=Path, default=Path("bench-long.json"))
    args = p.parse_args()
    model = demo_model()
    work = Path(tempfile.mkdtemp(prefix="vergeai-bench-long-"))
    s = Settings(model, args.ctx, args.slots, args.threads, work)
    banned = end_of_generation_tokens(model)
    extra = args.vergeai_args.split()
    targets = []
    for tree, prefix in ((None, "vergeai"), (args.base, "vergeai-base")):
        if prefix == "vergeai-base" and tree is None:
            continue
        if args.speculation != "off":
            targets.append(make_vergeai(s, extra, prefix, tree))
        if args.speculation != "on":
            nospec = [*extra, "--speculate", "off"]
            targets.append(make_vergeai(s, nospec, f"{prefix}-nospec", tree))
    if not args.skip_llama_server:
        binary = args.llama_server or build_llama_server(DEFAULT_BUILD_SCRIPT)
        for name, flags in (
            ("llama-server", []),
            ("llama-server-ngram", ["--spec-type", "ngram-simple"]),
        ):
            if name == "llama-server" or args.llama_server_ngram:
                ls = llama_server(binary, s, [*args.llama_server_args.split(), *flags], name)
                targets.append(Target(name, ls, lambda a: MODEL_NAME, False, False))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {} for t in targets}
    try:
        for t in targets:
            t.server.start()
        for name in args.workloads.split(","):
            for r in range(args.rounds):
                for t in targets:
                    tag = f"{name}-{r}-{t.name}-{time.time_ns()}"
                    result = asyncio.run(run_one(t, banned, name, tag, args.temperature))
                    results[t.name].setdefault(name, []).append(result)
                    print(f"{t.name:12} {name:12} round {r}: {fmt(result)}", file=sys.stderr)
    finally:
        for t in targets:
            t.server.stop()
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"logs in {work}; results in {args.json}", file=sys.stderr)
    return 0


async def run_one(
    t: Target, banned: tuple[int, ...], name: str, tag: str, temperature: float
) -> dict[str, Any]:
    c = Client(t, banned, temperature)
    try:
        return await RUNNERS[name](c, tag)
    finally:
        await c.http.aclose()


def fmt(result: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}={one(x)}" for k, x in v.items()) + "}"
        return str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in result.items() if k != "errors" or v)


def report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Each metric per workload: every server's rounds, and each vergeai ÷ llama-server."""
    names = list(results)
    mine = [n for n in names if n.startswith("vergeai")]
    peer = "llama-server" if "llama-server" in names else None
    ratios = [f"{m.removeprefix('vergeai') or 'ratio'}÷" for m in mine] if peer else []
    print(
        f"\n{'workload':14}{'metric':26}"
        + "".join(f"{n:>24}" for n in names)
        + "".join(f"{r:>10}" for r in ratios)
    )
    for workload, rounds in results[names[0]].items():
        for metric in flatten(rounds[0]):
            cells, means = [], {}
            for n in names:
                values = [flatten(r).get(metric) for r in results[n].get(workload, [])]
                values = [v for v in values if isinstance(v, (int, float))]
                cells.append(" / ".join(f"{v:.1f}" for v in values))
                means[n] = statistics.mean(values) if values else float("nan")
            shown = [f"{means[m] / means[peer]:.2f}x" if peer and means[peer] else "" for m in mine]
            print(
                f"{workload:14}{metric:26}"
                + "".join(f"{c:>24}" for c in cells)
                + "".join(f"{r:>10}" for r in (shown if peer else []))
            )


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif k != "errors":
            out[prefix + k] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
