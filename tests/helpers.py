"""Test helpers shared by the test modules: constants, the CLI, servers, clients.

Fixtures and pytest hooks stay in conftest.py; everything else that more
than one module uses lives here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import openai
from typer.testing import CliRunner

from vergeai.cli import app as cli_app

if TYPE_CHECKING:
    from vergeai.service import Service

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

EOS = 1
END_OF_TURN = 106  # Gemma's <end_of_turn>
EOS_TEXT = 212  # </s>, also end-of-generation
# a logit_bias that bans every end-of-generation token of Gemma 3: answers run to max_tokens
NO_EOS = {str(t): -100 for t in (EOS, END_OF_TURN, EOS_TEXT)}
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
# prose the demo model copies word for word when asked to repeat it
HARBOR = (
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

# the refused request fields -> a value that asks for the feature (test_params checks
# that it names every refused field of the schema)
REFUSED: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "mirostat": 2,
    "typical_p": 0.5,
    "tfs_z": 0.9,
    "dynatemp_range": 0.5,
    "xtc_probability": 0.5,
    "dry_multiplier": 0.8,
    "top_n_sigma": 1.0,
    "ignore_eos": True,
    "n_probs": 5,
}


# the CLI


def run_cli(state_dir: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli_app, [*args, "--state-dir", str(state_dir)], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_ok(state_dir: Path, *args: str) -> str:
    code, out, err = run_cli(state_dir, *args)
    assert code == 0, f"vergeai {' '.join(args)} exited {code}: {err}"
    return out


def relabel(
    model: str,
    out: Path,
    template: Path | None = None,
    uint32s: dict[str, int] | None = None,
) -> str:
    """A copy of a GGUF with another chat template (and uint32 metadata) set; its path.

    The metadata is rewritten and the tensor data copied as bytes, which
    takes a fraction of a second where gguf-py's gguf_new_metadata takes ten.
    """
    from vergeai.gguf import _Reader

    strings = {"tokenizer.chat_template": template.read_text()} if template else {}
    ints = uint32s or {}
    with open(model, "rb") as src:
        data = src.read()
    r = _Reader(data)
    r.skip(4)
    version, n_tensors, n_kv = r.unpack("I"), r.unpack("Q"), r.unpack("Q")
    kept, alignment = [], 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string().decode()
        value = r.value(r.unpack("I"))
        if key == "general.alignment" and value:
            alignment = value
        if key not in strings and key not in ints:
            kept.append(data[start : r.pos])
    table_start = r.pos
    for _ in range(n_tensors):
        r.string()
        r.skip(8 * r.unpack("I"))
        r.skip(4 + 8)
    table = data[table_start : r.pos]
    data_start = -(-r.pos // alignment) * alignment

    def key(name: str) -> bytes:
        return struct.pack("<Q", len(name.encode())) + name.encode()

    for name, text in strings.items():
        kept.append(key(name) + struct.pack("<IQ", 8, len(text.encode())) + text.encode())
    for name, number in ints.items():
        kept.append(key(name) + struct.pack("<II", 4, number))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept) + table
    with open(out, "wb") as f:
        f.write(head + b"\0" * (-len(head) % alignment))
        f.write(memoryview(data)[data_start:])
    return str(out)


def by_assistant(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workers view's engines by the assistants they serve: a model worker under each
    assistant on its model, a remote one under its assistant."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        for name in w.get("assistants") or [w.get("assistant")]:
            out[name] = w
    return out


def make_state(state_dir: Path, model_path: str, online: bool = True) -> tuple[str, str]:
    """An admin `root`, a user `bob` limited to `gemma`; assistants `gemma` and `other`.

    `other` is always offline; `gemma` too unless ``online``. Returns the
    admin's and bob's tokens.
    """
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2"]
    gemma = ["--ctx", "1024", "--parallel", "3", *([] if online else ["--offline"])]
    cli_ok(state_dir, "assistant", "create", "gemma", *common, *gemma)
    cli_ok(state_dir, "assistant", "create", "other", *common, "--ctx", "512", "--offline")
    cli_ok(state_dir, "user", "create", "root", "--role", "admin")
    cli_ok(state_dir, "user", "create", "bob", "--assistants", "gemma")
    admin = cli_ok(state_dir, "key", "create", "--user", "root", "--name", "admin").strip()
    user = cli_ok(state_dir, "key", "create", "--user", "bob", "--name", "app").strip()
    return admin, user


# the README's field lists


def readme_fields(heading: str) -> dict[str, set[str]]:
    """The field names each group's bullet names in a README section: kind -> names."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    markers = {"honoured": "**Honoured:**", "ignored": "**Accepted and ignored",
               "refused": "**Refused**"}  # fmt: skip
    return {
        kind: set(re.findall(r"`([a-z_]+)`", section.split(marker, 1)[1].split("\n- ", 1)[0]))
        for kind, marker in markers.items()
    }


# waiting


def eventually(check: Callable[[], bool], timeout: float = 2.5, what: str = "") -> None:
    """For what takes its own time: a model loading, a log line being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


# responses


def sse_events(response: httpx.Response) -> list[Any]:
    """The data payloads of an event stream, JSON-decoded; '[DONE]' stays a string."""
    events: list[Any] = []
    for line in response.iter_lines():
        if not line or line.startswith(":"):  # blank, or a comment (": waiting")
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, checked for its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


# `vergeai serve` as a subprocess: the real-model tier


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
    env: dict[str, str] = field(default_factory=dict)  # added to the environment

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
                env={**os.environ, **self.env},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vergeai serve exited:\n{self.log()}")
            try:
                r = httpx.get(f"{self.root_url}/health", timeout=1.0, verify=self.tls or True)
                # wait_online: until no model is still loading (and one at least serves,
                # unless none is meant to)
                status = r.json()["status"]
                if (
                    not wait_online
                    or status == "offline"
                    or (r.status_code == 200 and status != "loading")
                ):
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

    def wait_logged(self, text: str, timeout: float = 5.0) -> str:
        """The log once it holds ``text``: the access line of a request is written after
        its response was sent, so a test that reads the log right away can miss it."""
        eventually(lambda: text in self.log(), timeout, what=f"{text!r} in the server log")
        return self.log()

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


class BackgroundStream:
    """A streamed chat completion running in a thread while the test does other things.

    As a context manager it waits for the first event on entry and for the
    end of the stream on exit; ``start()`` and ``join()`` do the same alone.
    """

    def __init__(self, root_url: str, token: str, model: str, max_tokens: int = 24) -> None:
        self.events: list[Any] = []
        self.times: list[float] = []  # time.monotonic() of each event
        self.status = 0
        self.error: BaseException | None = None
        self.max_tokens = max_tokens
        self.started = threading.Event()
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Count slowly from one to one hundred."}],
            "max_tokens": max_tokens,
            "logit_bias": NO_EOS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.url = f"{root_url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float = 30) -> BackgroundStream:
        self.thread.start()
        assert self.started.wait(timeout), "the background stream never started"
        return self

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.join()

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=60) as http,
                http.stream("POST", self.url, json=self.body, headers=self.headers) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        payload = line[len("data: ") :]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.times.append(time.monotonic())
                        self.started.set()
        except BaseException as exc:  # reported by completed()
            self.error = exc
        finally:
            self.started.set()

    def longest_gap(self) -> float:
        """The longest wait in seconds between two of its events."""
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)

    def completed(self) -> bool:
        """Ended with [DONE] after every token it asked for, and no error event."""
        self.join()
        if self.error is not None or self.status != 200:
            return False
        if not self.events or self.events[-1] != "[DONE]":
            return False
        chunks = self.events[:-1]
        if any("error" in c for c in chunks):
            return False
        choices = [choice for c in chunks for choice in c["choices"]]
        pieces = [choice["delta"].get("content") or "" for choice in choices]
        usage = chunks[-1].get("usage") or {}
        return (
            any(pieces)
            and choices[-1]["finish_reason"] == "length"
            and usage.get("completion_tokens") == self.max_tokens
        )


# the app in-process: the fast tier


class AppClient:
    """`create_app` over httpx's ASGI transport, driven from synchronous tests.

    No Hypercorn and no model: for what the HTTP layer decides alone (auth,
    validation, routing, error shapes). The state dir is read when the
    client is made and on ``refresh()``; the server polls it instead.
    """

    def __init__(self, state_dir: Path, metrics_public: bool = False) -> None:
        # imported here: modules that only test the CLI need not load the app and llama.cpp
        from vergeai.api.app import create_app
        from vergeai.service import Service
        from vergeai.state.store import Store

        self.service: Service = Service(Store(state_dir))
        self.refresh()
        self.app = create_app(self.service, metrics_public=metrics_public)
        self.transport = httpx.ASGITransport(app=self.app)
        self.runner = asyncio.Runner()
        self.http = httpx.AsyncClient(transport=self.transport, base_url="http://vergeai.test")

    def __enter__(self) -> AppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runner.run(self.http.aclose())
        self.runner.close()
        self.service.pool.close()

    def refresh(self) -> None:
        """Apply what the CLI changed in the state dir."""
        assert self.service.refresh(force=True), "the state dir did not load"

    def run(self, work: Awaitable[T]) -> T:
        """Await ``work`` (a coroutine, or an awaitable such as the openai client's pages)."""

        async def wait() -> T:
            return await work

        return self.runner.run(wait())

    def request(
        self, method: str, url: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        if token is not None:
            kwargs["headers"] = {"Authorization": f"Bearer {token}", **kwargs.get("headers", {})}
        return self.run(self.http.request(method, url, **kwargs))

    def get(self, url: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, token, **kwargs)

    def post(self, url: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, token, **kwargs)

    def openai(self, token: str) -> openai.AsyncOpenAI:
        """The official client over the same transport; run its calls with ``run()``."""
        return openai.AsyncOpenAI(
            base_url="http://vergeai.test/v1",
            api_key=token,
            max_retries=0,
            http_client=httpx.AsyncClient(transport=self.transport),  # type: ignore[arg-type]
        )


@dataclass
class FastDeployment:
    """The state of ``make_state(online=False)`` behind an in-process app."""

    app: AppClient
    admin_token: str
    user_token: str

    @property
    def state_dir(self) -> Path:
        return self.app.service.store.root
