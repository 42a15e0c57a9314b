"""README command 1 for real: `vergeai serve --demo`, then the examples against it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import ROOT, cli_ok, free_port

TOKEN_RE = re.compile(r"vai-[A-Za-z0-9_-]{43}")


def start_demo(state: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vergeai", "serve", "--demo", "--port", str(port),
             "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0


def test_demo_serves_the_examples(tmp_path: Path) -> None:
    state, log, port = tmp_path / "state", tmp_path / "serve.log", free_port()
    proc = start_demo(state, port, log)
    try:
        output = log.read_text()
        tokens = set(TOKEN_RE.findall(output))
        assert len(tokens) == 1, output
        token = tokens.pop()
        assert f"curl http://localhost:{port}/v1/chat/completions" in output
        env = {
            **os.environ,
            "VERGEAI_KEY": token,
            "VERGEAI_URL": f"http://127.0.0.1:{port}/v1",
        }
        for example in ("stream.py", "chat.py"):
            run = subprocess.run(
                [sys.executable, str(ROOT / "examples" / example)],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            assert run.stdout.strip(), f"{example} printed no answer"
        if shutil.which("curl"):
            run = subprocess.run(
                ["bash", str(ROOT / "examples" / "curl.sh")],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert run.returncode == 0 and '"chat.completion"' in run.stdout, run.stderr
        assert token not in (state / "keys.toml").read_text()
        assert any(k["user"] == "demo" for k in _keys(state))
    finally:
        stop(proc)
    # a second start finds the demo assistant and makes no new key
    proc = start_demo(state, port, tmp_path / "again.log")
    try:
        assert not TOKEN_RE.findall((tmp_path / "again.log").read_text())
        assert len(_keys(state)) == 1
    finally:
        stop(proc)


def _keys(state: Path) -> list[dict[str, str]]:
    import json

    return list(json.loads(cli_ok(state, "key", "list", "--json")))


def test_readme_commands_install_into_a_virtual_environment(tmp_path: Path) -> None:
    """A stock Debian or Ubuntu Python refuses `pip install` outside a virtual environment."""
    quick_start = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick_start, re.S)
    assert len(commands) == 2, commands
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    for command, extra in zip(commands, ("demo", "test"), strict=True):
        assert command.startswith(f"{venv}pip install '.[{extra}]' && "), command
    run = subprocess.run(
        ["bash", "-c", venv + "python -c 'import sys; print(sys.prefix)'"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == tmp_path / ".venv"
