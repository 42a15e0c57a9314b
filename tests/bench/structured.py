"""Structured output side by side: vergeai (llguidance) vs llama-server (its grammar sampler).

    python tests/bench/structured.py [--model F.gguf] [--requests 8] [--levels 1,4]

Both servers get the same slots, threads and per-sequence context. Each
workload asks for output held to a JSON schema or a GBNF grammar, greedy, on
prompts of random words the model cannot copy, so every token goes through
the grammar. Reports per level: decode tokens/s per stream (the servers' own
timings), total completion tokens/s, and how many answers were valid.

To measure another vergeai checkout (an older commit) with the same script,
run it with that checkout first on PYTHONPATH: the server process inherits it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DEFAULT_BUILD_SCRIPT, demo_model
from servers import (
    MODEL_NAME,
    Server,
    Settings,
    build_llama_server,
    llama_server,
    vergeai,
    wait_for_quiet,
)

WORDS = [
    "amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "hollow", "indigo",
    "juniper", "kelp", "lumen", "marble", "nectar", "onyx", "pewter", "quartz", "russet",
    "saffron", "tundra", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr",
]  # fmt: skip
CITIES = {
    "type": "array", "minItems": 6, "maxItems": 6,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "population": {"type": "integer"},
            "coastal": {"type": "boolean"},
            "district": {"enum": ["north", "south", "east", "west"]},
        },
        "required": ["name", "population", "coastal", "district"],
    },
}  # fmt: skip
LIST_GRAMMAR = 'root ::= item{12}\nitem ::= "- " [a-z]{3,10} " " [0-9]{1,4} "\\n"'
WORKLOADS = {
    "json schema": lambda: {"response_format": {
        "type": "json_schema", "json_schema": {"name": "cities", "schema": CITIES}}},
    "gbnf": lambda: {"grammar": LIST_GRAMMAR},
}  # fmt: skip


def prompt(rng: random.Random) -> list[dict[str, str]]:
    words = " ".join(rng.choice(WORDS) for _ in range(60))
    return [{"role": "user", "content": f"{words}\nList six cities from the words above."}]


def ask(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.root + "/v1/chat/completions", json=body, headers=server.headers,
                   timeout=600)  # fmt: skip
    r.raise_for_status()
    return dict(r.json())


def valid(workload: str, text: str) -> bool:
    if workload == "gbnf":
        return len(text.splitlines()) == 12
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, list) and len(value) == 6


def measure(server: Server, workload: str, requests: int, level: int) -> dict[str, float]:
    rng = random.Random(7)
    common = {"model": MODEL_NAME, "max_tokens": 400, "temperature": 0}
    bodies = [{**common, "messages": prompt(rng), **WORKLOADS[workload]()} for _ in range(requests)]
    ask(server, bodies[0])  # warm up (vergeai builds its grammar vocabulary once)
    start = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        replies = list(pool.map(lambda b: ask(server, b), bodies))
    wall = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    per_stream = [r["timings"]["predicted_per_second"] for r in replies]
    good = sum(valid(workload, r["choices"][0]["message"]["content"]) for r in replies)
    return {
        "decode_tok_s": statistics.mean(per_stream),
        "total_tok_s": tokens / wall,
        "tokens": tokens / requests,
        "valid": good / requests,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--build-script", type=Path, default=DEFAULT_BUILD_SCRIPT)
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--vergeai-args", default="", help='e.g. "--speculate off"')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vergeai-structured-"))
    s = Settings(args.model or demo_model(), args.ctx, args.slots, args.threads, work)
    servers = [vergeai(s, extra=args.vergeai_args.split())]
    if not args.skip_llama_server:
        servers.append(llama_server(build_llama_server(args.build_script), s, []))
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    try:
        for server in servers:
            server.start()
            for workload in WORKLOADS:
                for level in levels:
                    wait_for_quiet(30)
                    got = measure(server, workload, args.requests, level)
                    results.setdefault(workload, {}).setdefault(server.name, {})[level] = got
            server.stop()
    finally:
        for server in servers:
            server.stop()
    print(f"\n{'workload':12} {'level':>5} {'server':14} {'decode tok/s':>13} "
          f"{'total tok/s':>12} {'tokens':>7} {'valid':>6}")  # fmt: skip
    for workload, by_server in results.items():
        for level in levels:
            for name, by_level in by_server.items():
                r = by_level[level]
                print(
                    f"{workload:12} {level:>5} {name:14} {r['decode_tok_s']:>13.1f} "
                    f"{r['total_tok_s']:>12.1f} {r['tokens']:>7.0f} {r['valid']:>6.0%}"
                )
    (work / "structured.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults in {work / 'structured.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
