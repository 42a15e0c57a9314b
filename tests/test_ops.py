"""Operating a running daemon: workers view, live changes, health, metrics, signals, TLS."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from helpers import (
    NO_EOS,
    BackgroundStream,
    Server,
    by_assistant,
    cli_ok,
    eventually,
    free_port,
    run_cli,
)

from vergeai.server import EXIT_MARGIN

STORY = [{"role": "user", "content": "Tell me a story."}]


def vergeai(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vergeai", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


LIVE_SECONDS = 2.0  # the promise: CLI changes reach a running server within 2 s


def applied(check: Callable[[], bool], what: str) -> None:
    """Checked once, 2 s after the change: a slow request cannot eat into the promise."""
    time.sleep(LIVE_SECONDS)
    assert check(), f"not applied within {LIVE_SECONDS}s: {what}"


class Ops:
    def __init__(self, server: Server, admin: str, user: str) -> None:
        self.server = server
        self.admin = admin
        self.user = user

    @property
    def state(self) -> Path:
        return self.server.state_dir

    def status(self, token: str, body: dict[str, Any] | None = None) -> int:
        with self.server.http(token) as http:
            if body is None:
                return http.get("/v1/models").status_code
            return http.post("/v1/chat/completions", json=body).status_code

    def chat(self, token: str, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": STORY, "max_tokens": 2, **extra}
        with self.server.http(token) as http:
            return http.post("/v1/chat/completions", json=body)

    def models(self) -> dict[str, str]:
        with self.server.http(self.admin) as http:
            return {m["id"]: m["status"] for m in http.get("/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Ops]:
    root = tmp_path_factory.mktemp("ops")
    state = root / "state"
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2"]
    cli_ok(state, "user", "create", "root", "--role", "admin")
    cli_ok(state, "user", "create", "bob")
    cli_ok(state, "assistant", "create", "gemma", *common, "--ctx", "1024", "--parallel", "2")
    cli_ok(state, "assistant", "create", "spare", *common, "--ctx", "512", "--offline")
    admin = cli_ok(state, "key", "create", "--user", "root", "--name", "admin").strip()
    user = cli_ok(state, "key", "create", "--user", "bob", "--name", "app").strip()
    (state / "config.toml").write_text('log_format = "json"\ngrace_seconds = 20\n')
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Ops(server, admin, user)
    finally:
        server.stop()


def test_workers_without_a_daemon_exits_3(tmp_path: Path) -> None:
    code, out, err = run_cli(tmp_path / "nothing", "workers")
    assert code == 3
    assert "AI-Helper worker is not running" in err
    assert "vergeai serve" in err
    assert out == ""


def test_workers_shows_helper_and_loaded_models(ops: Ops) -> None:
    result = vergeai(ops.state, "workers", "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert ops.server.proc is not None
    helper = snap["helper"]
    assert helper["pid"] == ops.server.proc.pid
    assert helper["listen"] == [f"http://127.0.0.1:{ops.server.port}"]
    assert helper["rss_bytes"] > 100 * 2**20
    workers = by_assistant(snap["workers"])
    assert set(workers) == {"gemma"}, "an offline assistant has no model worker"
    gemma = workers["gemma"]
    assert gemma["state"] == "online" and gemma["error"] is None
    assert gemma["ctx"] == 1024 and gemma["parallel"] == 2 and gemma["threads"] == 2
    assert gemma["model_bytes"] > 200 * 2**20
    assert gemma["kv_cache_bytes"] > 0
    assert snap["assistants"] == {"gemma": "online", "spare": "offline"}
    ops.chat(ops.user, "gemma", logit_bias=NO_EOS)
    after = by_assistant(json.loads(vergeai(ops.state, "workers", "--json").stdout)["workers"])
    assert after["gemma"]["requests_served"] >= 1
    assert after["gemma"]["tokens_generated"] >= 2
    assert after["gemma"]["last_predicted_per_second"] > 0
    human = vergeai(ops.state, "workers")
    assert human.returncode == 0
    for word in ("AI-Helper worker", "model workers", "gemma", "online", "KV cache"):
        assert word in human.stdout


def test_health_lists_assistant_states(ops: Ops) -> None:
    response = httpx.get(f"http://127.0.0.1:{ops.server.port}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["assistants"]["gemma"] == "online"


def sample(text: str, series: str) -> float:
    """One series' value in a Prometheus text page; 0 when it has no sample yet."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_requests_and_tokens(ops: Ops) -> None:
    """What a served request adds; who may read /metrics is tested in test_api_fast.py."""
    served = 'vergeai:requests_total{assistant="gemma",status="200"}'
    predicted = 'vergeai:tokens_predicted_total{assistant="gemma"}'
    prompt = 'vergeai:prompt_tokens_total{assistant="gemma"}'

    def scrape() -> str:
        with ops.server.http(ops.admin) as http:
            response = http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    assert ops.chat(ops.user, "gemma", logit_bias=NO_EOS).status_code == 200
    # a request is counted once its answer was sent
    eventually(lambda: sample(scrape(), served) == sample(before, served) + 1, what="counted")
    text = scrape()
    assert sample(text, predicted) == sample(before, predicted) + 2
    assert sample(text, prompt) > sample(before, prompt)
    model = json.loads(vergeai(ops.state, "assistant", "show", "gemma", "--json").stdout)["model"]
    for name in (
        'vergeai:request_duration_seconds_bucket{assistant="gemma"',
        'vergeai:time_to_first_token_seconds_count{assistant="gemma"}',
        f'vergeai:requests_processing{{model="{model}"}}',
        f'vergeai:requests_deferred{{model="{model}"}}',
        f'vergeai:model_load_seconds{{model="{model}"}}',
        f'vergeai:model_loaded{{model="{model}"}} 1.0',
    ):
        assert name in text, name


def test_access_log_is_json_without_tokens(ops: Ops) -> None:
    mark = f"access-{uuid.uuid4().hex[:12]}"
    body = {"model": "gemma", "messages": STORY, "max_tokens": 2, "logit_bias": NO_EOS}
    with ops.server.http(ops.user) as http:
        response = http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": mark})
    assert response.status_code == 200
    log = ops.server.wait_logged(mark)  # the line is written after the answer was sent
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [e for e in lines if e["logger"] == "vergeai.access" and e["request_id"] == mark]
    assert len(access) == 1
    line = access[0]
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["assistant"] == "gemma" and line["user"] == "bob"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 2 and line["duration_ms"] > 0
    assert ops.admin not in log and ops.user not in log


def test_live_changes_apply_without_breaking_a_stream(ops: Ops) -> None:
    stream = BackgroundStream(ops.server.root_url, ops.user, "gemma", max_tokens=300).start()
    assert stream.error is None

    # a revoked key and a disabled user are refused on their next request
    cli_ok(ops.state, "user", "create", "eve")
    eve = cli_ok(ops.state, "key", "create", "--user", "eve", "--name", "k").strip()
    spare_key = cli_ok(ops.state, "key", "create", "--user", "bob", "--name", "spare").strip()
    applied(lambda: ops.status(eve) == 200, what="new key accepted")
    cli_ok(ops.state, "key", "revoke", "spare", "--user", "bob")
    applied(lambda: ops.status(spare_key) == 401, what="revoked key refused")
    cli_ok(ops.state, "user", "disable", "eve")
    applied(lambda: ops.status(eve) == 401, what="disabled user refused")
    cli_ok(ops.state, "user", "enable", "eve")
    applied(lambda: ops.status(eve) == 200, what="re-enabled user accepted")

    # a system prompt edit applies to the next request
    before = ops.chat(ops.admin, "gemma").json()["usage"]["prompt_tokens"]
    cli_ok(ops.state, "assistant", "edit", "gemma", "--system-prompt", "You are a pirate. " * 5)
    applied(
        lambda: ops.chat(ops.admin, "gemma").json()["usage"]["prompt_tokens"] > before + 20,
        what="system prompt applied",
    )
    # a sampling default applies to the next request
    cli_ok(ops.state, "assistant", "edit", "gemma", "--max-tokens", "3")
    body = {"model": "gemma", "messages": STORY, "logit_bias": NO_EOS}
    with ops.server.http(ops.admin) as http:
        applied(
            lambda: (
                http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
                == 3
            ),
            what="max_tokens default applied",
        )
        body["max_tokens"] = 5
        assert (
            http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 5
        )

    # online: loading in the background, then online
    cli_ok(ops.state, "assistant", "online", "spare")
    eventually(lambda: ops.models()["spare"] == "online", timeout=30, what="spare online")
    assert ops.chat(ops.admin, "spare").status_code == 200
    # a load setting reloads the context
    cli_ok(ops.state, "assistant", "edit", "spare", "--ctx", "768")

    def spare_ctx() -> int:
        snap = json.loads(vergeai(ops.state, "workers", "--json").stdout)
        return by_assistant(snap["workers"]).get("spare", {}).get("ctx", 0)

    eventually(lambda: spare_ctx() == 768, timeout=30, what="spare reloaded with ctx 768")
    eventually(lambda: ops.chat(ops.admin, "spare").status_code == 200, timeout=30, what="spare ok")

    # offline: new requests refused, the in-flight one finishes, the worker is freed
    spare_stream = BackgroundStream(ops.server.root_url, ops.admin, "spare", max_tokens=60).start()
    cli_ok(ops.state, "assistant", "offline", "spare")
    applied(lambda: ops.chat(ops.admin, "spare").status_code == 503, what="spare refused")
    spare_stream.join(60)
    assert spare_stream.completed(), (spare_stream.error, spare_stream.events[-3:])

    def spare_gone() -> bool:
        snap = json.loads(vergeai(ops.state, "workers", "--json").stdout)
        return "spare" not in by_assistant(snap["workers"])

    eventually(spare_gone, what="spare worker freed")

    stream.join(120)
    assert stream.completed(), (stream.error, stream.events[-3:])
    cli_ok(ops.state, "assistant", "edit", "gemma", "--system-prompt", "")


def test_delete_refuses_new_requests(ops: Ops, model_path: str) -> None:
    cli_ok(ops.state, "assistant", "create", "temp", "--model", model_path,
           "--chat-format", "gemma", "--threads", "2", "--ctx", "256")  # fmt: skip
    eventually(lambda: ops.models().get("temp") == "online", timeout=30, what="temp online")
    cli_ok(ops.state, "assistant", "delete", "temp", "--yes")
    applied(lambda: ops.chat(ops.admin, "temp").status_code == 404, what="temp gone")


def test_broken_state_file_keeps_last_good_config(ops: Ops) -> None:
    users = ops.state / "users.toml"
    good = users.read_text()
    said = "keeping the last good configuration"
    before = ops.server.log().count(said)
    try:
        users.write_text("[users.root\nrole = ")
        eventually(lambda: ops.server.log().count(said) > before, what="the broken file noticed")
        assert ops.status(ops.user) == 200
        assert ops.chat(ops.user, "gemma").status_code == 200
    finally:
        users.write_text(good)


def test_sighup_reloads(ops: Ops) -> None:
    assert ops.server.proc is not None
    before = ops.server.log().count("state dir loaded")
    ops.server.proc.send_signal(signal.SIGHUP)
    eventually(lambda: ops.server.log().count("state dir loaded") > before, what="reload logged")
    assert ops.server.proc.poll() is None
    assert ops.status(ops.user) == 200


def test_second_server_on_same_state_dir_refuses(ops: Ops) -> None:
    result = vergeai(ops.state, "serve", "--port", str(free_port()))
    assert result.returncode == 1
    assert "already running" in result.stderr


def test_sigterm_drains_an_in_flight_stream(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path,
           "--chat-format", "gemma", "--threads", "2", "--ctx", "512")  # fmt: skip
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    # a grace no busy machine runs out of: what is checked is the drain, not the speed
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log",
                    extra_args=["--grace-seconds", "300"])  # fmt: skip
    server.start()
    try:
        stream = BackgroundStream(server.root_url, token, "gemma", max_tokens=80).start()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        stream.join(300)
        assert stream.completed(), (stream.error, stream.events[-3:], server.log())
        assert server.proc.wait(300) == 0
        assert not (state / "admin.sock").exists()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
    finally:
        server.stop()


def test_a_stop_stuck_past_the_grace_is_forced_to_end() -> None:
    """A worker stuck in one step (or a thread in native code) cannot keep the server up:
    the grace's watchdog ends the process. A thread that never ends stands in for it."""
    code = (
        "import threading, time\n"
        "from vergeai.server import Deadline\n"
        "threading.Thread(target=time.sleep, args=(120,)).start()\n"
        "Deadline(0.5).start()\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 0.5 + EXIT_MARGIN + 20  # not the thread's 120 s
    assert "still stopping past the grace" in result.stderr


def test_health_is_503_while_loading(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path,
           "--chat-format", "gemma", "--threads", "2", "--ctx", "512")  # fmt: skip
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log")
    server.start(wait_online=False)
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 200 not in seen:
            with contextlib.suppress(httpx.TransportError):
                seen.add(httpx.get(f"http://127.0.0.1:{server.port}/health").status_code)
        assert 200 in seen
        assert seen <= {200, 503}
    finally:
        server.stop()


def test_tls_with_a_self_signed_certificate(tmp_path: Path, model_path: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path,
           "--chat-format", "gemma", "--threads", "2", "--ctx", "512")  # fmt: skip
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log", tls=context)
    server.extra_args = ["--certfile", str(certfile), "--keyfile", str(keyfile)]
    server.start()
    try:
        assert server.root_url.startswith("https://")
        client = server.client(token)
        reply = client.chat.completions.create(
            model="gemma", messages=STORY, max_tokens=3, logit_bias=NO_EOS
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.root_url}/health")  # untrusted without the test CA
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health")  # no plain HTTP on a TLS port
        # the openai client still holds its keep-alive HTTPS connection, which
        # once kept the server from exiting for asyncio's 30 s TLS shutdown
        assert server.stop(timeout=10) == 0
    finally:
        server.stop()


def test_bad_config_file_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.toml").write_text("port = 'eighty'\n")
    result = vergeai(state, "serve")
    assert result.returncode == 1
    assert "config.toml" in result.stderr and "port" in result.stderr
    assert "Traceback" not in result.stderr
    (state / "config.toml").write_text("colour = 'blue'\n")
    result = vergeai(state, "serve")
    assert result.returncode == 1 and "colour" in result.stderr
    (state / "config.toml").write_text("cache_scope = 'team'\n")
    result = vergeai(state, "serve")
    assert result.returncode == 1 and "cache_scope: must be one of user, key" in result.stderr
    (state / "config.toml").write_text("store_mb_per_user = 0\n")
    result = vergeai(state, "serve")
    assert result.returncode == 1 and "store_mb_per_user: must be between" in result.stderr
    for line, said in [
        ("memory_budget = -1", "memory_budget: must be a number of bytes"),
        ("memory_budget = '8GiB'", "memory_budget: expected int"),
        ("memory_wait = 99999", "memory_wait: must be between 0 and 3600"),
        ("saved_prefix_mb = -5", "saved_prefix_mb: must be a number of MiB"),
    ]:
        (state / "config.toml").write_text(line + "\n")
        result = vergeai(state, "serve")
        assert result.returncode == 1 and said in result.stderr, (line, result.stderr)
    assert vergeai(state, "serve", "--log-format", "xml").returncode == 2
    assert vergeai(state, "serve", "--certfile", "x.pem").returncode == 2


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format", "gemma")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = vergeai(state, "serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not (state / "admin.sock").exists()


def test_key_list_shows_last_used(ops: Ops) -> None:
    ops.chat(ops.user, "gemma", logit_bias=NO_EOS)

    def last_used() -> str | None:
        keys = json.loads(cli_ok(ops.state, "key", "list", "--user", "bob", "--json"))
        return next(k["last_used"] for k in keys if k["name"] == "app")

    eventually(lambda: last_used() is not None, timeout=5, what="last_used recorded")
    assert ops.user not in (ops.state / "usage.db").read_bytes().decode("latin-1")
