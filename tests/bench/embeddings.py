"""Embeddings side by side: vergeai's /v1/embeddings vs llama-server's, on the same GGUF.

    python tests/bench/embeddings.py [--model F.gguf] [--inputs 256] [--batch 1,16] [--levels 1,4]

Both servers get the same slots, threads and per-sequence context;
llama-server runs with --embedding --pooling mean (what vergeai uses for a
model without a pooling type of its own). Reports inputs embedded per second
for each request size (inputs per request) and concurrency, and the cosine
between the two servers' embeddings of the same text (both L2-normalised).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

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

WORDS = ["river", "mountain", "copper", "violet", "engine",
         "harbor", "lantern", "meadow", "signal", "orchard"]  # fmt: skip


def texts(n: int) -> list[str]:
    """Distinct sentences of about 20 tokens, so no cache can help."""
    return [
        f"Sentence {i}: the " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(12)) + "."
        for i in range(n)
    ]


def embed(server: Server, batch: list[str]) -> list[list[float]]:
    body = {"model": MODEL_NAME, "input": batch, "encoding_format": "float"}
    r = httpx.post(server.root + "/v1/embeddings", json=body, headers=server.headers, timeout=300)
    r.raise_for_status()
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def rate(server: Server, inputs: list[str], batch: int, level: int) -> float:
    batches = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    embed(server, batches[0])  # warm up
    start = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        list(pool.map(lambda b: embed(server, b), batches))
    return len(inputs) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF (default: the demo model)")
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--batch", default="1,16", help="inputs per request, comma-separated")
    p.add_argument("--levels", default="1,4", help="concurrent requests, comma-separated")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--llama-server", help="llama-server binary (default: build it)")
    args = p.parse_args()
    binary = args.llama_server or build_llama_server(DEFAULT_BUILD_SCRIPT)
    work = Path(tempfile.mkdtemp(prefix="vergeai-embed-bench-"))
    settings = Settings(args.model or demo_model(), args.ctx, args.slots, args.threads, work)
    servers = [
        vergeai(settings, embedding=True),
        llama_server(binary, settings, ["--embedding", "--pooling", "mean"]),
    ]
    inputs = texts(args.inputs)
    results: dict[str, dict[tuple[int, int], float]] = {}
    vectors = {}
    for server in servers:
        wait_for_quiet(30)
        server.start()
        try:
            vectors[server.name] = np.array(embed(server, inputs[:8]))
            results[server.name] = {
                (b, c): rate(server, inputs, b, c)
                for b in map(int, args.batch.split(","))
                for c in map(int, args.levels.split(","))
            }
        finally:
            server.stop()
    a, b = (vectors[s.name] for s in servers)
    cosine = float(np.mean(np.sum(a * b, axis=1)))
    print(
        f"embeddings, inputs/s ({args.inputs} inputs of ~20 tokens, {args.slots} slots, "
        f"{args.threads} threads); cosine between the servers' vectors: {cosine:.4f}"
    )
    header = ("inputs/request", "concurrency", "vergeai", "llama-server", "ratio")
    print("{:>15} {:>12} {:>9} {:>13} {:>6}".format(*header))
    for key, ours in results[servers[0].name].items():
        theirs = results[servers[1].name][key]
        print(f"{key[0]:>15} {key[1]:>12} {ours:>9.1f} {theirs:>13.1f} {ours / theirs:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
