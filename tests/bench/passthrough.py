"""What vergeai costs in front of an upstream: one llama-server, asked directly and through vergeai.

vergeai runs a remote assistant whose one upstream is the llama-server; the
same streams (a short unique prompt, 128 tokens out, end-of-generation
banned) go to llama-server directly and through vergeai, interleaved round
by round, at c=1 and c=8. Reported per level: median TTFT of each path and
the difference, and total tok/s of each path and the ratio.

On one small machine the front and the upstream share CPUs, so vergeai's
work on each chunk also slows the upstream's decoding; ``--upstream-cpus``
and ``--front-cpus`` (taskset lists) give each its own, as separate hosts
would (the benchmark's client runs on the front's).

    python tests/bench/passthrough.py --llama-server PATH [--rounds 3] [--json out.json]
        [--upstream-cpus 0 --front-cpus 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from long import Client, Stream, Target, passage, user
from run import DEFAULT_BUILD_SCRIPT, demo_model
from servers import (
    MODEL_NAME,
    Server,
    Settings,
    build_llama_server,
    free_port,
    llama_server,
    vergeai_cli,
)
from workload import end_of_generation_tokens

LEVELS = (1, 8)
MAX_TOKENS = 128


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def front(s: Settings, upstream: Server, cpus: str | None) -> Target:
    """vergeai with one remote assistant on the llama-server."""
    state = s.work_dir / "vergeai-front-state"
    vergeai_cli(state, "user", "create", "bench", "--role", "admin")
    token = vergeai_cli(state, "key", "create", "--user", "bench", "--name", "bench").strip()
    vergeai_cli(state, "assistant", "create", MODEL_NAME, "--upstream", upstream.root,
                "--upstream-model", MODEL_NAME)  # fmt: skip
    port = free_port()
    argv = [sys.executable, "-m", "vergeai", "serve", "--port", str(port), "--state-dir",
            str(state)]  # fmt: skip
    log = s.work_dir / "vergeai-front.log"
    server = Server("vergeai", pinned(argv, cpus), port, log, "/health",
                    {"Authorization": f"Bearer {token}"})  # fmt: skip
    return Target("via vergeai", server, lambda a: a, sessions=False, system_in_server=False)


async def level(t: Target, banned: tuple[int, ...], n: int, tag: str) -> dict[str, Any]:
    """n streams at once, three times over: median TTFT and total tok/s."""
    c = Client(t, banned)
    streams: list[Stream] = []
    started = time.perf_counter()
    try:
        for wave in range(3):
            batch = [
                c.stream([user(passage(f"{tag}-{wave}-{i}", 20))], MAX_TOKENS) for i in range(n)
            ]
            streams += await asyncio.gather(*batch)
    finally:
        await c.http.aclose()
    wall = time.perf_counter() - started
    failed = [s.error for s in streams if s.error]
    tokens = sum(len(s.times) for s in streams)
    return {
        "ttft_ms": statistics.median(s.ttft for s in streams if not s.error) * 1000,
        "total_tps": tokens / wall,
        "errors": failed,
    }


async def ttft_pairs(
    direct: Target, via: Target, banned: tuple[int, ...], pairs: int
) -> tuple[list[float], list[float]]:
    """One stream at a time, to each path in turn: TTFT without queueing, in ms.

    Over kept-alive connections, as the openai SDKs keep them.
    """
    clients = [Client(direct, banned), Client(via, banned)]
    for c in clients:
        await c.http.aclose()
        c.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
    times: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(pairs):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                s = await clients[j].stream([user(passage(f"pair-{i}-{j}", 20))], 2)
                if s.error:
                    print(f"pair {i}: {s.error}", file=sys.stderr)
                else:
                    times[j].append(s.ttft * 1000)
    finally:
        for c in clients:
            await c.http.aclose()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-server", help="llama-server binary (default: build one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=60, help="single streams to each path in turn")
    p.add_argument("--upstream-cpus", help="taskset CPU list for llama-server, e.g. 0")
    p.add_argument("--front-cpus", help="taskset CPU list for vergeai and the client, e.g. 1")
    p.add_argument("--json", type=Path, default=Path("bench-passthrough.json"))
    args = p.parse_args()
    model = demo_model()
    work = Path(tempfile.mkdtemp(prefix="vergeai-bench-passthrough-"))
    s = Settings(model, 1024, max(LEVELS), args.threads, work)
    banned = end_of_generation_tokens(model)
    binary = args.llama_server or build_llama_server(DEFAULT_BUILD_SCRIPT)
    upstream = llama_server(binary, s, [])
    upstream.argv = pinned(upstream.argv, args.upstream_cpus)
    if args.front_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.front_cpus.split(",")})
    direct = Target("llama-server", upstream, lambda a: MODEL_NAME, False, False)
    via = front(s, upstream, args.front_cpus)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {direct.name: {}, via.name: {}}
    try:
        upstream.start()
        via.server.start()
        for r in range(args.rounds):
            for n in LEVELS:
                for t in (direct, via) if r % 2 == 0 else (via, direct):
                    result = asyncio.run(level(t, banned, n, f"{t.name}-{r}-{n}-{time.time_ns()}"))
                    results[t.name].setdefault(n, []).append(result)
                    print(f"{t.name:13} c={n} round {r}: ttft {result['ttft_ms']:.1f} ms, "
                          f"{result['total_tps']:.1f} tok/s {result['errors'] or ''}",
                          file=sys.stderr)  # fmt: skip
        pairs = asyncio.run(ttft_pairs(direct, via, banned, args.pairs))
    finally:
        via.server.stop()
        upstream.stop()
    args.json.write_text(json.dumps({**results, "ttft_pairs": pairs}, indent=2) + "\n")
    print(f"\n{'level':8}{'metric':14}{'llama-server':>16}{'via vergeai':>16}   difference")
    for n in LEVELS if args.rounds else ():
        d, v = results[direct.name][n], results[via.name][n]
        ttft = [statistics.median(x["ttft_ms"] for x in rs) for rs in (d, v)]
        tps = [statistics.mean(x["total_tps"] for x in rs) for rs in (d, v)]
        print(f"c={n:<6}{'TTFT ms':14}{ttft[0]:>16.1f}{ttft[1]:>16.1f}   "
              f"{ttft[1] - ttft[0]:+.1f} ms")  # fmt: skip
        print(f"{'':8}{'total tok/s':14}{tps[0]:>16.1f}{tps[1]:>16.1f}   {tps[1] / tps[0]:.3f}x")
    d, v = (statistics.median(t) for t in pairs)
    print(f"{'alone':8}{'TTFT ms':14}{d:>16.1f}{v:>16.1f}   {v - d:+.1f} ms "
          f"(median of {args.pairs} streams to each, one at a time)")  # fmt: skip
    print(f"logs in {work}; results in {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
