"""Start, probe and stop the three servers under test, and read their peak memory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VERGEAI = "vergeai"
LLAMA_SERVER = "llama-server"
LLAMA_CPP_PYTHON = "llama-cpp-python"
PEERS = (LLAMA_SERVER, LLAMA_CPP_PYTHON)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MODEL_NAME = "bench"  # the `model` field of every request (vergeai: the assistant's name)


@dataclass(frozen=True)
class Settings:
    """What every server gets: one model, the same per-conversation context, threads, slots."""

    model: str
    ctx: int  # tokens per conversation (slot)
    slots: int
    threads: int
    work_dir: Path


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    health_path: str
    headers: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # another checkout's, to run its vergeai (with env from checkout_env)
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us, not it; we stop it ourselves
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(self.root + self.health_path, headers=self.headers, timeout=2.0)
                if r.status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def peak_rss_kib(self) -> int:
        """VmHWM of the server and all its descendants (summed: an upper bound)."""
        if self.proc is None:
            return 0
        return sum(_vm_hwm_kib(pid) for pid in _process_tree(self.proc.pid))

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server and its descendants."""
        if self.proc is None:
            return 0.0
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.proc.pid))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return pids


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used (from /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet(max_wait: float, cores: float = 0.3) -> float:
    """Wait (up to max_wait s) until the machine uses under `cores` CPUs; returns the last load."""
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        before = machine_busy_seconds()
        time.sleep(0.5)
        load = (machine_busy_seconds() - before) / 0.5
        if load < cores or time.monotonic() >= deadline:
            return load
        if not told:
            print(f"waiting for the machine to go quiet ({load:.1f} CPUs busy) …", file=sys.stderr)
            told = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_llama_server(script: Path) -> str:
    """Run the build script (cached after the first time); it prints the binary's path."""
    print(f"building llama-server with {script} (cached after the first run) …", file=sys.stderr)
    out = subprocess.run(
        ["bash", str(script), sys.executable], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    return out.strip().splitlines()[-1]


def llama_server(binary: str, s: Settings, extra: list[str], name: str = LLAMA_SERVER) -> Server:
    port = free_port()
    argv = [
        binary,
        "-m", s.model,
        "-c", str(s.ctx * s.slots),  # llama-server's -c is the whole context, shared by slots
        "-np", str(s.slots),
        "-t", str(s.threads),
        "-tb", str(s.threads),
        # the demo GGUF carries no template; --no-jinja makes "gemma" name the built-in one
        # (with jinja on, llama-server would take the word "gemma" as the template text)
        "--no-jinja", "--chat-template", "gemma",
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra,
    ]  # fmt: skip
    return Server(name, argv, port, s.work_dir / f"{name}.log", "/health")


def llama_cpp_python(s: Settings) -> Server:
    """llama-cpp-python's server runs one request at a time: it gets one conversation's context."""
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", s.model,
        "--model_alias", MODEL_NAME,
        "--n_ctx", str(s.ctx),
        "--n_threads", str(s.threads),
        "--n_threads_batch", str(s.threads),
        "--chat_format", "gemma",
        "--interrupt_requests", "False",  # else each new request cuts off the running stream
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    return Server(LLAMA_CPP_PYTHON, argv, port, s.work_dir / "llama-cpp-python.log", "/v1/models")


def checkout_env(tree: Path | None) -> dict[str, str] | None:
    """An environment in which ``python -m vergeai``, run in ``tree``, runs that checkout's
    package (``-m`` puts the working directory first on the path)."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": str(tree.resolve())}


def vergeai_cli(state_dir: Path, *args: str, tree: Path | None = None) -> str:
    argv = [sys.executable, "-m", "vergeai", *args, "--state-dir", str(state_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tree, env=checkout_env(tree))
    if done.returncode != 0:
        raise RuntimeError(f"vergeai {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def vergeai(s: Settings, embedding: bool = False, extra: list[str] | None = None) -> Server:
    state = s.work_dir / ("vergeai-embedding-state" if embedding else "vergeai-state")
    vergeai_cli(state, "user", "create", "bench", "--role", "admin")
    token = vergeai_cli(state, "key", "create", "--user", "bench", "--name", "bench").strip()
    vergeai_cli(
        state, "assistant", "create", MODEL_NAME,
        "--model", s.model,
        "--chat-format", "gemma",
        "--threads", str(s.threads),
        "--ctx", str(s.ctx),  # per conversation; the llama.cpp context is ctx * parallel
        "--parallel", str(s.slots),
        *(["--embedding"] if embedding else []),
        *(extra or []),
    )  # fmt: skip
    port = free_port()
    argv = [
        sys.executable, "-m", "vergeai", "serve",
        "--port", str(port),
        "--state-dir", str(state),
    ]  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    return Server(VERGEAI, argv, port, s.work_dir / "vergeai.log", "/health", headers)
