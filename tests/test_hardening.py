"""A hostile but authenticated caller cannot hurt other callers (issue 8's defects).

One server: ``gemma`` (online, 2 slots), ``broken`` (online, but its GGUF was
truncated after it was created), ``spare`` (offline); config.toml sets a 2 s
read timeout and a cap of 6 open connections. Hostile bodies that are
refused before any model is involved are tested in test_api_fast.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    HELLO,
    NO_EOS,
    BackgroundStream,
    Server,
    cli_ok,
    error_of,
    eventually,
    free_port,
    run_cli,
)

CHAT = "/v1/chat/completions"
READ_TIMEOUT = 2
MAX_CONNECTIONS = 6


@dataclass
class Hard:
    server: Server
    token: str
    truncated_size: int

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post("/v1/chat/completions", json=body, **kwargs)

    def marked(self, body: Any) -> tuple[httpx.Response, str]:
        """A request with its own X-Request-ID, to find its access line in the log."""
        mark = f"hard-{uuid.uuid4().hex[:12]}"
        return self.post(body, headers={"X-Request-ID": mark}), mark

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
        yield Hard(server, token, 50_000_000)
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


def test_a_failed_load_is_503_with_retry_after(hard: Hard) -> None:
    """An offline assistant's 503 is tested in test_api_fast.py."""
    eventually(lambda: hard.health().json()["assistants"]["broken"] == "error", timeout=30)
    response = hard.post({"model": "broken", "messages": HELLO, "max_tokens": 1})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    err = error_of(response)
    assert err["type"] == "unavailable_error"
    assert "truncated" in err["message"]


# hostile input


def test_model_names_cannot_forge_or_hide_log_lines(hard: Hard) -> None:
    forged = "gemma\n2026-01-01 00:00:00,000 INFO vergeai.access: GET /admin 200 user=root"
    marks = []
    for model in (forged, "a\x00b\x07c\u202ed", "x" * 100_000):
        response, mark = hard.marked({"model": model, "messages": HELLO})
        marks.append(mark)
        assert response.status_code == 404
        assert len(response.text) < 2000  # the name is not echoed whole
    with hard.server.http(hard.token) as http:
        marks.append(f"hard-{uuid.uuid4().hex[:12]}")
        path = "/v1/models/a%0Ab%1B%5B31m"
        assert http.get(path, headers={"X-Request-ID": marks[-1]}).status_code == 404
    for mark in marks:  # every one of them was logged: what is not in the log was escaped
        log = hard.server.wait_logged(f"request_id={mark}")
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())
    assert "\\x0a2026-01-01 00:00:00,000" not in log  # the name never reached the log at all
    assert not any(c in log for c in "\x00\x07\u202e\x1b")


def test_hostile_grammars_are_400_and_cannot_crash_or_forge(hard: Hard) -> None:
    deep = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000  # overflowed llama.cpp's stack
    forged = 'root ::= "a\n2026-01-01 00:00:00,000 INFO vergeai.access: forged ::= ]'
    for grammar, why in ((deep, "nest deeper"), (forged, "cannot be enforced")):
        body = {"model": "gemma", "messages": HELLO, "grammar": grammar}
        response = hard.post(body)
        assert response.status_code == 400, response.text
        assert why in error_of(response)["message"]
        assert "\n" not in error_of(response)["message"]
    assert hard.post({"model": "gemma", "messages": HELLO, "max_tokens": 1}).status_code == 200
    log = hard.server.log()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())


def test_exceptions_are_logged_once_without_traceback_noise(hard: Hard) -> None:
    """Requests of the kinds that once raised inside the server or broke its logging."""
    marks: list[str] = []

    def headers() -> dict[str, str]:
        marks.append(f"hard-{uuid.uuid4().hex[:12]}")
        return {"X-Request-ID": marks[-1], "Content-Type": "application/json"}

    surrogate = b'{"model": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}'
    stream = {"model": "gemma", "messages": HELLO, "max_tokens": 300, "logit_bias": NO_EOS,
              "stream": True}  # fmt: skip
    with hard.server.http(hard.token) as http:
        assert http.post(CHAT, content=surrogate, headers=headers()).status_code == 400
        assert http.get("/v1/models/%ED%A0%80%FF", headers=headers()).status_code == 404
        bad_grammar = {"model": "gemma", "messages": HELLO, "grammar": "root ::= ]"}
        assert http.post(CHAT, json=bad_grammar, headers=headers()).status_code == 400
        with http.stream("POST", CHAT, json=stream, headers=headers()) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # then the client goes away mid-stream
    for mark in marks:
        log = hard.server.wait_logged(f"request_id={mark}", timeout=15)
    assert "Traceback" not in log
    assert "Logging error" not in log


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


def test_a_truncated_gguf_is_refused_by_the_cli(tmp_path: Path, model_path: str) -> None:
    full_size = Path(model_path).stat().st_size
    state = tmp_path / "state"
    part = tmp_path / "part.gguf"
    with open(model_path, "rb") as src:
        part.write_bytes(src.read(50_000_000))
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(part))
    assert code == 1
    assert f"truncated: 50000000 of {full_size} bytes" in err
    head = tmp_path / "head.gguf"
    with open(model_path, "rb") as src:
        head.write_bytes(src.read(1000))
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(head))
    assert code == 1 and "truncated" in err
    code, _, err = run_cli(state, "assistant", "create", "a", "--model", str(tmp_path / "no.gguf"))
    assert code == 1 and "file not found" in err
    whole = tmp_path / "whole.gguf"
    shutil.copyfile(model_path, whole)
    cli_ok(state, "assistant", "create", "a", "--model", str(whole), "--chat-format", "gemma")


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
