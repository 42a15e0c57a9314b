"""Models on demand: vergeai beside llama-server's router mode, on three models (copies
of the demo GGUF) of which two fit at once.

vergeai: models ``a``, ``b``, ``c`` loaded on demand, a ``memory_budget`` of
2.5 times one model's estimate; llama-server: ``--models-dir`` holding the
three files, ``--models-max 2``; the same context per slot, slots and
threads. Both are driven through their own router endpoints (``GET
/models``, ``POST /models/unload``). Cells:

- ``cold``: time to the first token of a request for an unloaded model;
- ``reload``: a request with a ~1,000-token system prompt of unique words,
  then its model unloaded, then the same system prompt with another
  question: time to its first token (vergeai saves the cached prefix at the
  unload and restores it at the load);
- ``alternate``: three clients, each sending requests one after another to
  its own model, so that the three models take turns in room for two:
  requests per second and p95 latency.

    python tests/bench/on_demand.py [--llama-server PATH] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from run import DEFAULT_BUILD_SCRIPT, demo_model
from servers import (
    LLAMA_SERVER,
    VERGEAI,
    Server,
    build_llama_server,
    free_port,
    vergeai_cli,
    wait_for_quiet,
)
from texts import unique_words

MODELS = ("a", "b", "c")
QUESTION = "In one sentence, what is the first word above?"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def setup(work: Path, ctx: int, slots: int, threads: int, binary: str | None) -> list[Server]:
    models = work / "models"
    models.mkdir(parents=True)
    for name in MODELS:
        shutil.copyfile(demo_model(), models / f"{name}.gguf")
    servers = []
    if binary:
        port = free_port()
        argv = [
            binary, "--models-dir", str(models), "--models-max", "2",
            "-c", str(ctx * slots), "-np", str(slots), "-t", str(threads), "-tb", str(threads),
            "--no-jinja", "--chat-template", "gemma", "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        servers.append(Server(LLAMA_SERVER, argv, port, work / "llama-server.log", "/health"))
    state = work / "vergeai-state"
    vergeai_cli(state, "user", "create", "bench", "--role", "admin")
    token = vergeai_cli(state, "key", "create", "--user", "bench", "--name", "bench").strip()
    for name in MODELS:
        vergeai_cli(state, "model", "add", name, "--file", str(models / f"{name}.gguf"),
                    "--chat-format", "gemma", "--ctx", str(ctx), "--parallel", str(slots),
                    "--threads", str(threads), "--keep-alive", "3600")  # fmt: skip
        vergeai_cli(state, "assistant", "create", name, "--model", name)
    listed = json.loads(vergeai_cli(state, "model", "list", "--json"))
    budget = int(2.5 * listed[0]["estimated_bytes"])
    (state / "config.toml").write_text(f"memory_budget = {budget}\nmemory_wait = 300\n")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vergeai",
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(state),
    ]
    headers = {"Authorization": f"Bearer {token}"}
    servers.append(Server(VERGEAI, argv, port, work / "vergeai.log", "/health", headers))
    return servers


async def statuses(http: httpx.AsyncClient, server: Server) -> dict[str, str]:
    r = await http.get(server.root + "/models", headers=server.headers)
    r.raise_for_status()
    found = {}
    for m in r.json()["data"]:
        name = Path(str(m["id"])).stem.split(":")[0]  # llama-server names them by file
        found[name] = m["status"]["value"]
    return found


async def unload_all(http: httpx.AsyncClient, server: Server) -> None:
    for name in MODELS:
        await http.post(server.root + "/models/unload", json={"model": name},
                        headers=server.headers)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = await statuses(http, server)
        if all(found.get(n) == "unloaded" for n in MODELS):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name}: models not unloaded: {await statuses(http, server)}")


async def ask(
    http: httpx.AsyncClient, server: Server, model: str, messages: list[dict[str, str]]
) -> tuple[float, float]:
    """Seconds to the first token and to the end of a streamed request."""
    body = {"model": model, "messages": messages, "max_tokens": 16, "stream": True,
            "temperature": 0}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    async with http.stream(
        "POST", server.root + "/v1/chat/completions", json=body, headers=server.headers
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{server.name}: {chunk['error']}")
                if any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), time.perf_counter() - t0


async def cold(http: httpx.AsyncClient, server: Server, tag: str) -> list[float]:
    await unload_all(http, server)
    return [
        (await ask(http, server, m, [{"role": "user", "content": f"{tag} {m}: say hello."}]))[0]
        for m in MODELS
    ]


async def reload(http: httpx.AsyncClient, server: Server, tag: str) -> float:
    system = unique_words(f"{server.name}-{tag}", 700)
    await unload_all(http, server)
    prompt = [{"role": "system", "content": system}]
    await ask(http, server, "a", [*prompt, {"role": "user", "content": QUESTION}])
    await unload_all(http, server)
    again = [*prompt, {"role": "user", "content": "And what is the last word above?"}]
    return (await ask(http, server, "a", again))[0]


async def alternate(
    http: httpx.AsyncClient, server: Server, tag: str, per_client: int
) -> dict[str, float]:
    await unload_all(http, server)
    latencies: list[float] = []

    async def client(model: str) -> None:
        for i in range(per_client):
            content = f"{tag} {model} {i}: say hello."
            latencies.append(
                (await ask(http, server, model, [{"role": "user", "content": content}]))[1]
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(client(m) for m in MODELS))
    wall = time.perf_counter() - t0
    return {"rps": len(latencies) / wall, "p95_s": p95(latencies)}


async def bench(servers: list[Server], rounds: int, per_client: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[Any]]] = {
        s.name: {"cold": [], "reload": [], "alternate": []} for s in servers
    }
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as http:
        for r in range(rounds):
            for server in servers:  # interleaved, so both see the machine alike
                wait_for_quiet(30)
                out = results[server.name]
                out["cold"].extend(await cold(http, server, f"round {r}"))
                out["reload"].append(await reload(http, server, f"round {r}"))
                out["alternate"].append(await alternate(http, server, f"round {r}", per_client))
                print(f"round {r + 1} {server.name}: {json.dumps(_summary(out))}", file=sys.stderr)
    return {name: _summary(out) for name, out in results.items()}


def _summary(out: dict[str, list[Any]]) -> dict[str, float]:
    alt = out["alternate"]
    return {
        "cold_ttft_ms": 1000 * statistics.median(out["cold"]) if out["cold"] else float("nan"),
        "reload_ttft_ms": 1000 * statistics.median(out["reload"])
        if out["reload"]
        else float("nan"),
        "alternate_rps": statistics.median(a["rps"] for a in alt) if alt else float("nan"),
        "alternate_p95_ms": 1000 * statistics.median(a["p95_s"] for a in alt)
        if alt
        else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-server", help="llama-server binary (default: build one)")
    p.add_argument("--skip-llama-server", action="store_true")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-client", type=int, default=4, help="requests of each alternate client")
    p.add_argument("--json", type=Path, default=Path("bench-on-demand.json"))
    args = p.parse_args()
    binary = None
    if not args.skip_llama_server:
        binary = args.llama_server or build_llama_server(DEFAULT_BUILD_SCRIPT)
    with tempfile.TemporaryDirectory(prefix="vergeai-bench-on-demand-") as tmp:
        servers = setup(Path(tmp), args.ctx, args.slots, args.threads, binary)
        try:
            for server in servers:
                server.start()
            summary = asyncio.run(bench(servers, args.rounds, args.per_client))
        finally:
            for server in servers:
                server.stop()
    names = list(summary)
    print(
        f"{'cell':<20}"
        + "".join(f"{n:>16}" for n in names)
        + ("   ratio" if len(names) > 1 else "")
    )
    for cell in next(iter(summary.values())):
        values = [summary[n][cell] for n in names]
        ratio = f"   {values[-1] / values[0]:.2f}x" if len(values) > 1 and values[0] else ""
        print(f"{cell:<20}" + "".join(f"{v:>16.1f}" for v in values) + ratio)
    args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
