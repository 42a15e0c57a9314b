"""Models under a memory budget: three copies of the demo GGUF (three files, three models)
and a budget that holds two; the least recently used idle model makes room, a busy one
never does; a request that cannot fit waits, then is told what holds the memory."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    NO_EOS,
    BackgroundStream,
    Server,
    cli_ok,
    error_of,
    eventually,
    free_port,
    run_cli,
)

MEMORY_WAIT = 8


class Budgeted:
    def __init__(self, server: Server, token: str, state: Path, budget: int) -> None:
        self.server, self.token, self.state, self.budget = server, token, state, budget

    def workers(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(cli_ok(self.state, "workers", "--json"))
        return snapshot

    def loaded(self) -> set[str]:
        return {w["model"] for w in self.workers()["workers"]}

    def chat(self, model: str, max_tokens: int = 2, **extra: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": max_tokens,
                    **extra,
                },
            )

    def set_load(self, mode: str, *names: str) -> None:
        """The models' load setting, once the server has read it."""
        for name in names:
            cli_ok(self.state, "model", "edit", name, "--load", mode)

        def seen() -> bool:
            with self.server.http(self.token) as http:
                models = {m["id"]: m for m in http.get("/models").json()["data"]}
            return all(models[name]["load"] == mode for name in names)

        eventually(seen, timeout=10, what=f"{names} {mode}")

    def settle(self, *names: str) -> None:
        """Only these models are loaded, and every one that unloaded has freed its memory."""
        for name in {"a", "b", "c"} - set(names):
            cli_ok(self.state, "model", "unload", name)
        for name in names:
            assert self.chat(name).status_code == 200
        eventually(lambda: self.loaded() == set(names), timeout=30, what=f"only {names} loaded")


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Budgeted]:
    root = tmp_path_factory.mktemp("budget")
    state = root / "state"
    small = ["--chat-format", "gemma", "--threads", "2", "--ctx", "512", "--parallel", "2"]
    for name in ("a", "b", "c"):
        copy = root / f"{name}.gguf"
        shutil.copyfile(model_path, copy)
        cli_ok(state, "model", "add", name, "--file", str(copy), *small, "--keep-alive", "600")
        cli_ok(state, "assistant", "create", name, "--model", name)
    cli_ok(state, "model", "add", "huge", "--file", model_path, "--chat-format", "gemma",
           "--ctx", "400000", "--parallel", "4")  # fmt: skip
    cli_ok(state, "assistant", "create", "huge", "--model", "huge")
    listed = {m["name"]: m for m in json.loads(cli_ok(state, "model", "list", "--json"))}
    assert listed["a"]["state"] == "not running"
    estimate = listed["a"]["estimated_bytes"]
    assert estimate > Path(model_path).stat().st_size  # the weights, and a context beside them
    budget = int(estimate * 2.5)  # two fit, three do not
    (state / "config.toml").write_text(f"memory_budget = {budget}\nmemory_wait = {MEMORY_WAIT}\n")
    cli_ok(state, "user", "create", "root", "--role", "admin")
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "admin").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Budgeted(server, token, state, budget)
    finally:
        server.stop()


def test_the_least_recently_used_idle_model_makes_room_never_a_busy_one(
    budgeted: Budgeted,
) -> None:
    budgeted.settle("a", "b")  # b used last
    assert budgeted.chat("c").status_code == 200
    assert budgeted.loaded() == {"b", "c"}  # a, the least recently used, made room
    assert "unloading model a to make room for c" in budgeted.server.log()

    stream = BackgroundStream(budgeted.server.root_url, budgeted.token, "b", max_tokens=96)
    with stream:  # b is busy: c, used more recently, is the one unloaded
        reply = budgeted.chat("a")
        assert reply.status_code == 200, reply.text
        assert "b" in budgeted.loaded()
    assert stream.completed()  # b's answer ended whole
    assert stream.events[-2]["usage"]["completion_tokens"] == 96
    assert budgeted.loaded() == {"a", "b"}


def test_a_request_that_cannot_fit_waits_then_names_what_holds_the_memory(
    budgeted: Budgeted,
) -> None:
    budgeted.settle("a", "b")
    budgeted.set_load("always", "a", "b")  # never unloaded to make room
    try:
        reply = budgeted.chat("c")
        assert reply.status_code == 503, reply.text
        message = error_of(reply)["message"]
        assert "model 'c' needs" in message and "MiB" in message
        assert "a (" in message and "b (" in message, message  # what holds the memory
        assert f"waited {MEMORY_WAIT} s" in message
        assert reply.headers["Retry-After"]
        assert budgeted.loaded() == {"a", "b"}
    finally:
        budgeted.set_load("on-demand", "a", "b")


def test_a_streamed_request_waiting_for_room_gets_comment_lines_then_tokens(
    budgeted: Budgeted,
) -> None:
    budgeted.settle("a", "b")
    streams = [
        BackgroundStream(budgeted.server.root_url, budgeted.token, name, max_tokens=40)
        for name in ("a", "b")
    ]
    lines: list[str] = []
    with (
        streams[0],  # both models busy: c waits for one to become idle
        streams[1],
        budgeted.server.http(budgeted.token) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "c",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 3,
                "logit_bias": NO_EOS,
                "stream": True,
            },
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(s.completed() for s in streams)
    assert lines[0] == ": waiting", lines[:3]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines.index(next(line for line in lines if line.startswith("data:"))) > 0
    assert data and "error" not in data[-1], data[-1:]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c["choices"])
    assert lines[-1] == "data: [DONE]"


def test_a_streamed_request_that_never_fits_gets_an_error_event(budgeted: Budgeted) -> None:
    budgeted.settle("a", "b")
    budgeted.set_load("always", "a", "b")
    try:
        with (
            budgeted.server.http(budgeted.token) as http,
            http.stream(
                "POST",
                "/v1/messages",
                headers={"x-api-key": budgeted.token},
                json={
                    "model": "c",
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "stream": True,
                },
            ) as response,
        ):
            assert response.status_code == 200  # the stream had begun: its error is an event
            lines = [line for line in response.iter_lines() if line]
    finally:
        budgeted.set_load("on-demand", "a", "b")
    assert lines[0] == ": waiting"
    assert lines[-2] == "event: error"
    error = json.loads(lines[-1][len("data: ") :])
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert "model 'c' needs" in error["error"]["message"]


def test_a_model_larger_than_the_budget_is_refused_at_once(budgeted: Budgeted) -> None:
    before = budgeted.loaded()
    reply = budgeted.chat("huge")
    assert reply.status_code == 503
    message = error_of(reply)["message"]
    assert "model 'huge' needs" in message and "more than the memory_budget" in message
    assert "waited" not in message
    assert budgeted.loaded() == before  # nothing was unloaded for it
    code, _, err = run_cli(budgeted.state, "model", "load", "huge")
    assert code == 1 and "more than the memory_budget" in err


def test_memory_is_estimated_then_measured_and_returned_on_unload(budgeted: Budgeted) -> None:
    budgeted.settle("a", "b")
    snapshot = budgeted.workers()
    info = snapshot["model_info"]
    for name in ("a", "b"):
        estimated, measured = info[name]["estimated_bytes"], info[name]["measured_bytes"]
        assert measured is not None and 0.75 < measured / estimated < 1.3, (estimated, measured)
        assert info[name]["state"] == "loaded" and info[name]["unloads_in_seconds"] > 500
    assert snapshot["memory"]["budget"] == budgeted.budget
    held = snapshot["memory"]["held"]
    assert held == info["a"]["measured_bytes"] + info["b"]["measured_bytes"]
    listed = {m["name"]: m for m in json.loads(cli_ok(budgeted.state, "model", "list", "--json"))}
    assert listed["a"]["state"] == "loaded" and listed["a"]["measured_bytes"]
    assert listed["c"]["state"] == "unloaded" and listed["c"]["measured_bytes"] is None
    table = cli_ok(budgeted.state, "workers")
    assert "estimated" in table and "of" in table

    rss = snapshot["helper"]["rss_bytes"]
    cli_ok(budgeted.state, "model", "unload", "b")
    eventually(lambda: budgeted.loaded() == {"a"}, timeout=30, what="b unloaded")
    freed = rss - budgeted.workers()["helper"]["rss_bytes"]
    weights = Path(budgeted.server.state_dir.parent / "b.gguf").stat().st_size
    assert freed > 0.8 * weights, (rss, freed)  # its weights and context left the process

    with budgeted.server.http(budgeted.token) as http:
        text = http.get("/metrics").text
    assert re.search(r'vergeai:model_loads_total\{model="b"\} [1-9]', text), text
    assert re.search(r'vergeai:model_unloads_total\{model="b"\} [1-9]', text)
    budget = re.search(r"^vergeai:memory_budget_bytes (\S+)$", text, re.M)
    assert budget is not None and float(budget[1]) == budgeted.budget
    assert re.search(r'vergeai:model_memory_bytes\{kind="measured",model="a"\} [1-9]', text), text


KEEP_ALIVE_CALLS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 1}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 16}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
]


@pytest.mark.parametrize(("path", "body"), KEEP_ALIVE_CALLS)
def test_a_request_sets_how_long_its_model_stays_loaded(
    budgeted: Budgeted, path: str, body: dict[str, Any]
) -> None:
    budgeted.settle("a")
    headers = {"x-api-key": budgeted.token} if path == "/v1/messages" else {}
    with budgeted.server.http(budgeted.token) as http:
        reply = http.post(path, headers=headers, json={"model": "a", "keep_alive": "90m", **body})
        assert reply.status_code == 200, reply.text
        unloads_in = budgeted.workers()["model_info"]["a"]["unloads_in_seconds"]
        assert 5000 < unloads_in <= 5400, unloads_in
        reply = http.post(path, headers=headers, json={"model": "a", "keep_alive": -1, **body})
        assert reply.status_code == 200
        assert budgeted.workers()["model_info"]["a"]["unloads_in_seconds"] is None
        for bad in ("soon", True, [], "1y", 10**12, "5 m"):
            reply = http.post(path, headers=headers, json={"model": "a", "keep_alive": bad, **body})
            assert reply.status_code == 400, (bad, reply.text)
            assert "keep_alive" in reply.text


def test_keep_alive_zero_unloads_the_model_once_idle(budgeted: Budgeted) -> None:
    budgeted.settle("a", "b")
    with budgeted.server.http(budgeted.token) as http:
        reply = http.post("/v1/embeddings", json={"model": "a", "input": "x", "keep_alive": 0})
        assert reply.status_code == 400  # a chat model: refused, and nothing changes
    assert budgeted.workers()["model_info"]["a"]["unloads_in_seconds"] > 500
    assert budgeted.chat("a", keep_alive=0).status_code == 200
    eventually(lambda: budgeted.loaded() == {"b"}, timeout=10, what="a unloaded once idle")
    assert budgeted.chat("a").status_code == 200  # loaded again, with its own keep-alive
    assert budgeted.workers()["model_info"]["a"]["unloads_in_seconds"] > 500


def test_concurrent_cold_requests_under_the_budget_load_once(budgeted: Budgeted) -> None:
    budgeted.settle("a", "b")
    replies: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: replies.append(budgeted.chat("c"))) for _ in range(16)
    ]
    log_before = budgeted.server.log().count("loading model c on demand")
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in replies] == [200] * 16, [r.text for r in replies]
    assert budgeted.server.log().count("loading model c on demand") == log_before + 1
    assert budgeted.loaded() == {"b", "c"}


def test_three_clients_on_three_models_take_turns_in_room_for_two(budgeted: Budgeted) -> None:
    # each client sends its next request as soon as its last is answered: its model is
    # idle only for a moment, which is when a model waiting to load gets the room
    budgeted.settle("a", "b")
    codes: dict[str, list[int]] = {name: [] for name in ("a", "b", "c")}
    errors: list[str] = []

    def client(name: str) -> None:
        for _ in range(3):
            reply = budgeted.chat(name, max_tokens=8)
            codes[name].append(reply.status_code)
            if reply.status_code != 200:
                errors.append(reply.text)

    threads = [threading.Thread(target=client, args=(name,)) for name in codes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert codes == {name: [200, 200, 200] for name in codes}, (codes, errors)
