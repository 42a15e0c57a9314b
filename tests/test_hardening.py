"""A hostile but authenticated caller cannot hurt other callers (issue 8's defects).

One server: ``gemma`` (online, 2 slots), ``broken`` (online, but its GGUF was
truncated after it was created), ``spare`` (offline); config.toml sets a 2 s
read timeout and a cap of 6 open connections.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, cli_ok, free_port
from helpers import HELLO, NO_EOS, BackgroundStream, error_of

READ_TIMEOUT = 2
MAX_CONNECTIONS = 6


@dataclass
class Hard:
    server: Server
    token: str
    truncated_size: int
    full_size: int

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post("/v1/chat/completions", json=body, **kwargs)

    def raw(self, raw: bytes) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post(
                "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
            )

    def metrics(self) -> str:
        with self.server.http(self.token) as http:
            response = http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.server.root_url}/health")


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Hard]:
    root = tmp_path_factory.mktemp("hard")
    state = root / "state"
    cli_ok(state, "user", "create", "root", "--role", "admin")
    common = ["--chat-format", "gemma", "--threads", "2", "--ctx", "512"]
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, *common, "--parallel", "2")
    link = root / "broken.gguf"
    link.symlink_to(model_path)
    cli_ok(state, "assistant", "create", "broken", "--model", str(link), *common)
    cli_ok(state, "assistant", "create", "spare", "--model", model_path, *common, "--offline")
    truncated = root / "truncated.gguf"
    full_size = Path(model_path).stat().st_size
    with open(model_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(50_000_000))
    link.unlink()
    link.symlink_to(truncated)  # the download went wrong after the assistant was made
    (state / "config.toml").write_text(
        f"read_timeout = {READ_TIMEOUT}\nmax_connections = {MAX_CONNECTIONS}\n"
    )
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Hard(server, token, 50_000_000, full_size)
    finally:
        server.stop()


# failure isolation


def test_penalties_work_and_do_not_disturb_another_stream(hard: Hard) -> None:
    with BackgroundStream(hard.server.root_url, hard.token, "gemma", max_tokens=32) as other:
        for field in ("presence_penalty", "frequency_penalty"):
            body = {"model": "gemma", "messages": HELLO, "max_tokens": 8, field: 0.1}
            response = hard.post(body)
            assert response.status_code == 200, response.text
    assert other.completed(), other.events[-3:]
    assert hard.health().json()["assistants"]["gemma"] == "online"


def test_health_is_degraded_naming_the_failed_assistant(hard: Hard) -> None:
    deadline = time.monotonic() + 30
    while hard.health().json()["assistants"]["broken"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    response = hard.health()
    assert response.status_code == 200  # gemma still serves
    body = response.json()
    assert body["status"] == "degraded"
    assert body["assistants"] == {"gemma": "online", "broken": "error", "spare": "offline"}
    assert set(body["failed"]) == {"broken"}
    assert f"truncated: {hard.truncated_size} of" in body["failed"]["broken"]


def test_every_503_has_retry_after(hard: Hard) -> None:
    for model in ("broken", "spare"):
        response = hard.post({"model": model, "messages": HELLO, "max_tokens": 1})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert error_of(response)["type"] == "unavailable_error"
    message = error_of(hard.post({"model": "broken", "messages": HELLO}))["message"]
    assert "truncated" in message


# hostile input


def test_lone_surrogates_are_400_and_metrics_stay_up(hard: Hard) -> None:
    bodies = [
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "gemma", "messages": [], "grammar": "\\ud800"}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
    ]
    for raw in bodies:
        response = hard.raw(raw)
        assert response.status_code == 400, response.text
        assert "surrogate" in error_of(response)["message"]
    hard.metrics()


def test_unknown_model_names_share_one_metrics_label(hard: Hard) -> None:
    assert hard.post({"model": "nope", "messages": HELLO}).status_code == 404
    before = hard.metrics()
    for i in range(20):
        response = hard.post({"model": f"nope-{i}", "messages": HELLO})
        assert response.status_code == 404
    after = hard.metrics()
    assert "nope-" not in after
    labels = set(re.findall(r'assistant="([^"]*)"', after))
    assert labels <= {"-", "gemma", "broken", "spare"}
    assert len(after.splitlines()) == len(before.splitlines())


def test_huge_integers_are_400_not_500(hard: Hard) -> None:
    for field in ("max_tokens", "seed", "temperature", "top_k"):
        raw = b'{"model": "gemma", "messages": [], "%s": 1%s}' % (field.encode(), b"0" * 4400)
        response = hard.raw(raw)
        assert response.status_code == 400, response.text
    for value in (10**30, -(10**30)):
        body = {"model": "gemma", "messages": HELLO, "seed": value}
        assert hard.post(body).status_code == 400


def test_nan_duplicates_and_deep_nesting_are_400(hard: Hard) -> None:
    for raw in (
        b'{"model": "gemma", "messages": [], "temperature": NaN}',
        b'{"model": "gemma", "model": "spare", "messages": []}',
        b'{"model": "gemma", "messages": ' + b"[" * 500 + b"]" * 500 + b"}",
    ):
        response = hard.raw(raw)
        assert response.status_code == 400, response.text
        assert error_of(response)["type"] == "invalid_request_error"


def test_model_names_cannot_forge_or_hide_log_lines(hard: Hard) -> None:
    forged = "gemma\n2026-01-01 00:00:00,000 INFO vergeai.access: GET /admin 200 user=root"
    for model in (forged, "a\x00b\x07c\u202ed", "x" * 100_000):
        response = hard.post({"model": model, "messages": HELLO})
        assert response.status_code == 404
        assert len(response.text) < 2000  # the name is not echoed whole
    with hard.server.http(hard.token) as http:
        assert http.get("/v1/models/a%0Ab%1B%5B31m").status_code == 404
    log = hard.server.log()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())
    assert "\\x0a2026-01-01 00:00:00,000" not in log  # the name never reached the log at all
    assert not any(c in log for c in "\x00\x07\u202e\x1b")


def test_hostile_grammars_are_400_and_cannot_crash_or_forge(hard: Hard) -> None:
    deep = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000  # overflowed llama.cpp's stack
    forged = 'root ::= "a\n2026-01-01 00:00:00,000 INFO vergeai.access: forged ::= ]'
    for grammar, why in ((deep, "nest deeper"), (forged, "could not parse")):
        body = {"model": "gemma", "messages": HELLO, "grammar": grammar}
        response = hard.post(body)
        assert response.status_code == 400, response.text
        assert why in error_of(response)["message"]
    assert hard.post({"model": "gemma", "messages": HELLO, "max_tokens": 1}).status_code == 200
    time.sleep(0.2)
    log = hard.server.log()
    assert "vergeai.llama_cpp" in log  # llama.cpp's complaint is logged, escaped
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())


def test_exceptions_are_logged_once_without_traceback_noise(hard: Hard) -> None:
    log = hard.server.log()
    assert "Traceback" not in log
    assert "Logging error" not in log


# request ids


def test_every_response_has_a_request_id(hard: Hard) -> None:
    with hard.server.http(hard.token) as http:
        responses = [
            http.get("/v1/models"),
            http.get("/health"),
            http.get("/v1/nothing"),
            http.post("/v1/chat/completions", json={"model": "gemma", "messages": HELLO,
                                                     "max_tokens": 1}),
            http.post("/v1/chat/completions", json={"model": "gemma"}),
        ]  # fmt: skip
        mine = http.get("/v1/models", headers={"X-Request-ID": "trace-42.a"})
        bad = http.get("/v1/models", headers={"X-Request-ID": "bad id\twith\x7f"})
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert mine.headers["x-request-id"] == "trace-42.a"
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])
    time.sleep(0.2)
    assert "request_id=trace-42.a" in hard.server.log()


# slow and abusive connections


def test_a_stalled_body_is_cut_off_while_others_are_served(hard: Hard) -> None:
    with socket.create_connection(("127.0.0.1", hard.server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + hard.token.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n0123456789"
        )
        start = time.monotonic()
        # meanwhile the server answers someone else
        body = {"model": "gemma", "messages": HELLO, "max_tokens": 2, "logit_bias": NO_EOS}
        assert hard.post(body).status_code == 200
        sock.settimeout(READ_TIMEOUT + 10)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 3


def test_slow_headers_are_cut_off(hard: Hard) -> None:
    with socket.create_connection(("127.0.0.1", hard.server.port)) as sock:
        start = time.monotonic()
        sock.settimeout(READ_TIMEOUT + 10)
        with pytest.raises(OSError):
            for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
            if not sock.recv(1):
                raise ConnectionResetError("closed")
        assert time.monotonic() - start < READ_TIMEOUT + 3


def test_connections_over_the_cap_get_503_until_some_close(hard: Hard) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", hard.server.port)) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        time.sleep(0.3)
        response = httpx.get(f"{hard.server.root_url}/health")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
        assert "too many open connections" in error_of(response)["message"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert hard.health().status_code == 200


# the state dir and the model file


def test_a_truncated_gguf_is_refused_by_the_cli(
    hard: Hard, tmp_path: Path, model_path: str
) -> None:
    from conftest import run_cli

    state = tmp_path / "state"
    part = tmp_path / "part.gguf"
    with open(model_path, "rb") as src:
        part.write_bytes(src.read(50_000_000))
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(part))
    assert code == 1
    assert f"truncated: 50000000 of {hard.full_size} bytes" in err
    head = tmp_path / "head.gguf"
    with open(model_path, "rb") as src:
        head.write_bytes(src.read(1000))
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(head))
    assert code == 1 and "truncated" in err
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(tmp_path / "no.gguf"))
    assert code == 1 and "file not found" in err
    whole = tmp_path / "whole.gguf"
    shutil.copyfile(model_path, whole)
    cli_ok(state, "assistant", "create", "a", "--model", str(whole))


def test_json_access_log_stays_one_object_per_line(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "root", "--role", "admin")
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log",
                    extra_args=["--log-format", "json"])  # fmt: skip
    server.start()
    try:
        with server.http(token) as http:
            http.post("/v1/chat/completions", json={"model": "a\nb\u202e\x00", "messages": HELLO})
            http.get("/v1/models/x%0Ay")
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    access = [r for r in records if r["logger"] == "vergeai.access" and r["path"] != "/health"]
    assert len(access) == 2
    assert access[0]["assistant"] == "-" and access[0]["status"] == 404
    assert access[1]["path"] == "/v1/models/x\ny"
    assert all("request_id" in r for r in access)


def test_log_escaping() -> None:
    from vergeai.logs import escape, log_token

    assert escape("plain text é 🦀") == "plain text é 🦀"
    assert escape("a\nb\r\x00\x07\x1b\u202e\u2028\ud800") == (
        "a\\x0ab\\x0d\\x00\\x07\\x1b\\u202e\\u2028\\ud800"
    )
    assert log_token("a b=c\"d'e\\f") == "a\\x20b\\x3dc\\x22d\\x27e\\x5cf"
    assert log_token("") == "-"
