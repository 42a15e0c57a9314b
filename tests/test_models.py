"""Models as records: `vergeai model …`, assistants naming one, the state dir from before,
and one model worker per loaded model, shared by its assistants, loaded on demand."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
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

from vergeai.state.store import Store


def models(state: Path) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in json.loads(cli_ok(state, "model", "list", "--json"))}


def fails(state: Path, *args: str, code: int = 1) -> str:
    rc, out, err = run_cli(state, *args)
    assert rc == code, f"vergeai {' '.join(args)} exited {rc}: {out}{err}"
    assert "Traceback" not in err
    return err


def files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file()}


# the CLI


def test_model_add_show_edit_list_remove(state: Path, model_path: str) -> None:
    cli_ok(state, "model", "add", "chat", "--file", model_path, "--chat-format", "gemma",
           "--ctx", "2048", "--parallel", "2", "--threads", "2", "--kv-type", "q8_0",
           "--flash-attn", "on", "--load", "always", "--keep-alive", "60",
           "--speculate", "off", "--max-queue", "3", "--gpu-layers", "0")  # fmt: skip
    row = json.loads(cli_ok(state, "model", "show", "chat", "--json"))
    assert row["file"] == model_path and row["ctx"] == 2048 and row["parallel"] == 2
    assert row["kv_type"] == "q8_0" and row["flash_attn"] == "on" and row["load"] == "always"
    assert row["keep_alive"] == 60.0 and row["speculate"] == "off" and row["max_queue"] == 3
    assert row["assistants"] == []
    fresh = json.loads(cli_ok(state, "model", "show", "chat", "--json"))
    assert fresh == row
    cli_ok(state, "model", "add", "plain", "--file", model_path, "--chat-format", "gemma")
    plain = models(state)["plain"]
    assert plain["load"] == "on-demand" and plain["keep_alive"] == 900.0  # new models' default
    assert plain["kv_type"] == "f16" and plain["flash_attn"] == "auto"

    cli_ok(state, "model", "edit", "chat", "--ctx", "1024", "--kv-type", "f16", "--threads", "none")
    row = models(state)["chat"]
    assert row["ctx"] == 1024 and row["kv_type"] == "f16" and row["threads"] is None
    assert row["parallel"] == 2  # untouched

    cli_ok(state, "assistant", "create", "coder", "--model", "chat", "--system-prompt", "Code.")
    cli_ok(state, "assistant", "create", "reviewer", "--model", "chat")
    assert models(state)["chat"]["assistants"] == ["coder", "reviewer"]
    assert len(models(state)) == 2  # naming a model makes none
    table = cli_ok(state, "model", "list")
    assert "chat" in table and "coder" in table

    before = files(state)
    err = fails(state, "model", "remove", "chat", "--yes")
    assert "coder" in err and "reviewer" in err
    assert files(state) == before
    cli_ok(state, "model", "remove", "plain", "--yes")
    assert set(models(state)) == {"chat"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "m"], 2, "--file"),
        (["add", "m.gguf", "--file", "{model}"], 1, "no '/' and no '.gguf'"),
        (["add", "a b", "--file", "{model}"], 1, "not a valid name"),
        (["add", "m", "--file", "/nonexistent.gguf"], 1, "file not found"),
        (["add", "m", "--file", "{model}", "--kv-type", "q5_1"], 2, "q5_1"),
        (["add", "m", "--file", "{model}", "--flash-attn", "maybe"], 2, "maybe"),
        (["add", "m", "--file", "{model}", "--load", "lazy"], 2, "lazy"),
        (["add", "m", "--file", "{model}", "--keep-alive", "-1"], 2, "--keep-alive"),
        (["add", "m", "--file", "{model}", "--ctx", "8"], 2, "--ctx"),
        (["add", "m", "--file", "{model}", "--kv-type", "q4_0", "--flash-attn", "off"], 1,
         "needs flash attention"),
        (["add", "m", "--file", "{model}"], 1, "no chat template"),  # and no --chat-format
        (["edit", "nope", "--ctx", "1024"], 1, "no model named 'nope'"),
        (["edit", "base"], 2, "nothing to change"),
        (["edit", "base", "--kv-type", "q8_0", "--flash-attn", "off"], 1, "flash attention"),
        (["add", "base", "--file", "{model}", "--chat-format", "gemma"], 1, "already exists"),
        (["show", "nope"], 1, "no model named 'nope'"),
        (["remove", "nope", "--yes"], 1, "no model named 'nope'"),
    ],
)  # fmt: skip
def test_model_commands_refuse_bad_input(
    state: Path, model_path: str, args: list[str], code: int, message: str
) -> None:
    cli_ok(state, "model", "add", "base", "--file", model_path, "--chat-format", "gemma")
    before = files(state)
    err = fails(state, "model", *[a.format(model=model_path) for a in args], code=code)
    assert message in err, err
    assert files(state) == before


def test_assistants_on_a_gguf_path_share_a_model_with_the_same_settings(
    state: Path, model_path: str
) -> None:
    common = ["--model", model_path, "--chat-format", "gemma", "--ctx", "1024"]
    cli_ok(state, "assistant", "create", "a", *common)
    cli_ok(state, "assistant", "create", "b", *common, "--system-prompt", "Be brief.")
    cli_ok(state, "assistant", "create", "c", *common[:4], "--ctx", "2048")
    found = models(state)
    assert len(found) == 2
    shared = next(m for m in found.values() if m["ctx"] == 1024)
    assert shared["assistants"] == ["a", "b"] and shared["load"] == "always"
    # a load setting given for an assistant whose model another runs: a copy, not a change
    cli_ok(state, "assistant", "edit", "b", "--parallel", "2")
    found = models(state)
    assert len(found) == 3 and found[shared["name"]]["parallel"] == 1
    assert found[shared["name"]]["assistants"] == ["a"]
    # the model of one assistant alone is changed in place
    cli_ok(state, "assistant", "edit", "a", "--parallel", "4")
    assert models(state)[shared["name"]]["parallel"] == 4 and len(models(state)) == 3
    err = fails(state, "assistant", "create", "d", "--model", "no-such-model")
    assert "no model named 'no-such-model'" in err
    err = fails(state, "assistant", "edit", "a", "--model", "no-such-model")
    assert "no model named" in err
    remote = ["--upstream", "http://127.0.0.1:9", "--upstream-model", "m"]
    err = fails(state, "assistant", "create", "r", *remote, "--parallel", "2", code=2)
    assert "--parallel" in err


# the state dir from before models were records

V1_ASSISTANTS = {
    "assistants": {
        "chat": {"model": "{model}", "chat_format": "gemma", "ctx": 1024, "parallel": 2,
                 "system_prompt": "You are Chat."},
        "twin": {"model": "{model}", "chat_format": "gemma", "ctx": 1024, "parallel": 2,
                 "temperature": 0.3},
        "big": {"model": "{model}", "chat_format": "gemma", "ctx": 2048, "online": False},
        "vllm": {"upstream": ["http://127.0.0.1:9"], "upstream_model": "m", "ctx": 8192,
                 "embedding": False},
    }
}  # fmt: skip


def v1_state(state: Path, model_path: str) -> None:
    cli_ok(state, "user", "create", "root", "--role", "admin")
    tables = json.loads(json.dumps(V1_ASSISTANTS).replace("{model}", model_path))
    (state / "assistants.toml").write_text(tomli_w.dumps(tables))


def test_a_state_dir_from_before_reads_and_migrates_without_loss(
    state: Path, model_path: str
) -> None:
    v1_state(state, model_path)
    old = (state / "assistants.toml").read_text()
    users = (state / "users.toml").read_bytes()
    # reading shows the new form and writes nothing
    rows = {r["name"]: r for r in json.loads(cli_ok(state, "assistant", "list", "--json"))}
    assert rows["chat"]["ctx"] == 1024 and rows["twin"]["temperature"] == 0.3
    assert rows["vllm"]["ctx"] == 8192 and rows["big"]["online"] is False
    assert not (state / "models.toml").exists()

    assert Store(state).migrate()
    assert (state / "assistants.toml.v1").read_text() == old
    assert (state / "users.toml").read_bytes() == users
    after = Store(state).load()
    assert not after.migrated and not Store(state).migrate()  # once
    chat, twin, big = (after.assistants[n] for n in ("chat", "twin", "big"))
    assert chat.model == twin.model != big.model  # alike settings share one model
    assert chat.system_prompt == "You are Chat." and twin.temperature == 0.3
    shared, alone = after.models[chat.model], after.models[big.model]
    assert (shared.file, shared.ctx, shared.parallel, shared.chat_format) == (
        model_path,
        1024,
        2,
        "gemma",
    )
    assert shared.load == "always"  # loaded at start, as it was
    assert alone.ctx == 2048 and alone.load == "on-demand"  # its assistant was offline
    assert after.assistants["vllm"].ctx == 8192
    stored = (state / "assistants.toml").read_text()
    assert "parallel" not in stored and model_path not in stored


def test_a_broken_state_dir_from_before_says_where(state: Path, model_path: str) -> None:
    v1_state(state, model_path)
    text = (state / "assistants.toml").read_text().replace("ctx = 2048", 'ctx = "big"')
    (state / "assistants.toml").write_text(text)
    before = files(state)
    err = fails(state, "assistant", "list")
    assert "[assistants.big] ctx" in err
    assert files(state) == before


# one model worker per model, loaded on demand


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("models")
    state = root / "state"
    small = ["--chat-format", "gemma", "--threads", "2", "--ctx", "512"]
    cli_ok(state, "model", "add", "shared", "--file", model_path, *small, "--parallel", "2",
           "--load", "always")  # fmt: skip
    cli_ok(state, "model", "add", "lazy", "--file", model_path, *small, "--keep-alive", "600")
    cli_ok(state, "model", "add", "q8", "--file", model_path, *small, "--kv-type", "q8_0",
           "--flash-attn", "on")  # fmt: skip
    cli_ok(state, "model", "add", "nofa", "--file", model_path, *small, "--flash-attn", "off")
    broken = root / "broken.gguf"
    broken.write_bytes(Path(model_path).read_bytes())
    cli_ok(state, "model", "add", "broken", "--file", str(broken), *small)
    broken.write_bytes(broken.read_bytes()[: 1 << 20])  # cut short since: it fails to load
    for name, model in [("coder", "shared"), ("reviewer", "shared"), ("lazy", "lazy"),
                        ("q8", "q8"), ("nofa", "nofa"), ("broken", "broken")]:  # fmt: skip
        cli_ok(state, "assistant", "create", name, "--model", model)
    cli_ok(state, "assistant", "edit", "reviewer", "--system-prompt", "You review code.")
    cli_ok(state, "user", "create", "root", "--role", "admin")
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "admin").strip()
    cli_ok(state, "user", "create", "bob")
    user = cli_ok(state, "key", "create", "--user", "bob", "--name", "app").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Served(server, token, state, user)
    finally:
        server.stop()


class Served:
    def __init__(self, server: Server, token: str, state: Path, user: str) -> None:
        self.server, self.token, self.state, self.user = server, token, state, user

    def workers(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(cli_ok(self.state, "workers", "--json"))
        return snapshot

    def loaded(self) -> dict[str, dict[str, Any]]:
        return {w["model"]: w for w in self.workers()["workers"] if not w.get("remote")}

    def chat(self, model: str, max_tokens: int = 4) -> Any:
        with self.server.http(self.token) as http:
            return http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": max_tokens,
                    "logit_bias": NO_EOS,
                },
            )


def test_two_assistants_on_one_model_share_one_worker_and_its_batch(served: Served) -> None:
    loaded = served.loaded()
    assert set(loaded) == {"shared"}  # on-demand models wait for their first request
    assert loaded["shared"]["assistants"] == ["coder", "reviewer"]
    states = served.workers()["models"]
    assert states["lazy"] == "unloaded" and states["shared"] in ("loaded", "busy")
    with served.server.http() as http:
        health = http.get("/health").json()
    assert health["status"] == "ok", health  # an on-demand model not loaded still serves
    assert health["assistants"]["lazy"] == "unloaded"

    streams = [
        BackgroundStream(served.server.root_url, served.token, name, max_tokens=48)
        for name in ("coder", "reviewer")
    ]
    busy: list[int] = []
    with streams[0], streams[1]:
        while 2 not in busy and not any(s.events[-1:] == ["[DONE]"] for s in streams):
            busy.append(served.loaded()["shared"]["busy_slots"])
    assert all(s.completed() for s in streams)
    assert 2 in busy, busy  # both assistants' requests in the one worker's slots at once
    models = {s.events[0]["model"] for s in streams}
    assert models == {"coder", "reviewer"}  # each answer names its assistant


def test_a_cold_model_loads_once_for_concurrent_requests_and_answers(served: Served) -> None:
    replies: list[Any] = []

    def ask() -> None:
        replies.append(served.chat("lazy"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in replies)
    assert served.server.log().count("loading model lazy on demand") == 1
    assert "lazy" in served.loaded()


def test_an_idle_on_demand_model_unloads_and_loads_again(served: Served) -> None:
    assert served.chat("lazy").status_code == 200
    cli_ok(served.state, "model", "edit", "lazy", "--keep-alive", "0.5")
    eventually(lambda: "lazy" not in served.loaded(), timeout=10, what="lazy unloading")
    eventually(
        lambda: served.workers()["models"]["lazy"] == "unloaded", timeout=10, what="unloaded"
    )
    assert served.loaded()["shared"]  # an always model stays
    reply = served.chat("lazy")
    assert reply.status_code == 200, reply.text
    cli_ok(served.state, "model", "edit", "lazy", "--keep-alive", "600")


def test_a_model_that_fails_to_load_is_failed_not_unloaded(served: Served) -> None:
    reply = served.chat("broken")
    assert reply.status_code == 503
    message = error_of(reply)["message"]
    assert "failed to load" in message and "broken" in message
    assert served.workers()["models"]["broken"] == "failed"
    with served.server.http() as http:
        health = http.get("/health").json()
    assert health["status"] == "degraded" and "broken" in health["failed"]
    again = served.chat("broken")  # within the retry delay: no new load
    assert again.status_code == 503
    assert served.server.log().count("loading model broken on demand") == 1


def test_kv_type_and_flash_attention_settings_load_and_answer(served: Served) -> None:
    for name in ("q8", "nofa"):
        reply = served.chat(name)
        assert reply.status_code == 200, reply.text
    loaded = served.loaded()
    # a q8_0 cache takes about 34/64 of an f16 one, for the same context and slots
    ratio = loaded["q8"]["kv_cache_bytes"] / loaded["nofa"]["kv_cache_bytes"]
    assert 0.5 < ratio < 0.56, ratio


def test_a_mistyped_model_changes_nothing(served: Served) -> None:
    before = served.workers()["models"]
    with served.server.http(served.token) as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"model": "shraed", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert reply.status_code == 404
    assert served.workers()["models"] == before


def test_moving_an_assistant_to_another_model(served: Served) -> None:
    cli_ok(served.state, "assistant", "edit", "reviewer", "--model", "lazy")
    eventually(
        lambda: served.loaded()["shared"]["assistants"] == ["coder"], timeout=5, what="moved"
    )
    reply = served.chat("reviewer")
    assert reply.status_code == 200 and reply.json()["model"] == "reviewer"
    cli_ok(served.state, "assistant", "edit", "reviewer", "--model", "shared")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_serve_migrates_a_state_dir_from_before(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    v1_state(state, model_path)
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log")
    server.start()
    try:
        assert (state / "models.toml").exists() and (state / "assistants.toml.v1").exists()
        with server.http(token) as http:
            for name in ("chat", "twin"):
                reply = http.post(
                    "/v1/chat/completions",
                    json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2},
                )  # fmt: skip
                assert reply.status_code == 200, reply.text
        loaded = [w for w in json.loads(cli_ok(state, "workers", "--json"))["workers"]
                  if not w.get("remote")]  # fmt: skip
        assert len(loaded) == 1 and loaded[0]["assistants"] == ["chat", "twin"]
    finally:
        server.stop()


def test_router_endpoints_list_load_and_unload_models(served: Served) -> None:
    with served.server.http(served.token) as http:
        listed = http.get("/models").json()
        status = {m["id"]: m["status"]["value"] for m in listed["data"]}
        assert status["shared"] in ("loaded", "busy") and status["nofa"] in ("unloaded", "loaded")
        entry = next(m for m in listed["data"] if m["id"] == "shared")
        assert entry["assistants"] == ["coder", "reviewer"] and entry["path"].endswith(".gguf")

        reply = http.post("/models/unload", json={"model": "nofa"})
        assert reply.status_code == 200 and reply.json()["success"] is True

        def state_of(name: str) -> str:
            found = {m["id"]: m for m in http.get("/models").json()["data"]}
            return str(found[name]["status"]["value"])

        eventually(lambda: state_of("nofa") == "unloaded", timeout=10, what="nofa unloaded")
        reply = http.post("/models/load", json={"model": "nofa"})
        assert reply.status_code == 200 and reply.json()["status"]["value"] in ("loading", "loaded")
        eventually(lambda: state_of("nofa") == "loaded", timeout=30, what="nofa loaded")
        for body, code in [
            ({"model": "nope"}, 404),
            ({}, 400),
            ({"model": 3}, 400),
            ([1], 400),
        ]:
            reply = http.post("/models/load", json=body)
            assert reply.status_code == code, (body, reply.text)
        assert http.post("/models/load", content=b"{").status_code == 400
    with served.server.http(served.user) as http:  # not an admin
        assert http.get("/models").status_code == 403
        assert http.post("/models/unload", json={"model": "shared"}).status_code == 403
    with served.server.http() as http:
        assert http.get("/models").status_code == 401
    assert served.workers()["models"]["shared"] in ("loaded", "busy")


def test_model_load_and_unload_from_the_shell(served: Served, tmp_path: Path) -> None:
    code, _, err = run_cli(served.state, "model", "unload", "q8")
    assert code == 0 and "model q8 is" in err
    eventually(lambda: "q8" not in served.loaded(), timeout=10, what="q8 unloaded")
    code, _, err = run_cli(served.state, "model", "load", "q8")
    assert code == 0 and "model q8 is" in err
    eventually(lambda: "q8" in served.loaded(), timeout=30, what="q8 loaded")
    code, _, err = run_cli(served.state, "model", "load", "nope")
    assert code == 1 and "no model named 'nope'" in err
    code, _, err = run_cli(tmp_path / "nothing", "model", "load", "q8")
    assert code == 3 and "not running" in err


SYSTEM = " ".join(f"Rule {i}: answer in plain words, briefly and kindly." for i in range(20))


def test_cached_prefixes_survive_an_unload(served: Served) -> None:
    def ask(question: str) -> dict[str, Any]:
        with served.server.http(served.token) as http:
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": "lazy",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                    ],
                    "max_tokens": 2,
                },
            )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    first = ask("What is a cat?")
    system_tokens = first["usage"]["prompt_tokens"] - 10  # all but the question and framing
    assert system_tokens > 150
    cli_ok(served.state, "model", "unload", "lazy")
    eventually(lambda: "lazy" not in served.loaded(), timeout=10, what="lazy unloaded")
    assert "model lazy: 1 cached prefixes saved" in served.server.log()
    saved = served.state / "prefixes" / "lazy"
    assert (saved / "saved.json").exists()
    assert (saved / "seq-0.bin").stat().st_mode & 0o777 == 0o600

    again = ask("What is a dog?")  # loads it again: the system prompt is not evaluated again
    assert "model lazy: 1 cached prefixes restored" in served.server.log()
    assert again["timings"]["cache_n"] >= system_tokens, again["timings"]
    assert not saved.exists()  # the slots hold it now

    # saved with one KV type, the cache is not loaded into another: it is deleted
    cli_ok(served.state, "model", "unload", "lazy")
    eventually(lambda: (saved / "saved.json").exists(), timeout=10, what="saved again")
    cli_ok(served.state, "model", "edit", "lazy", "--kv-type", "q8_0")
    try:
        eventually(lambda: served.workers()["models"]["lazy"] == "unloaded", timeout=10)
        third = ask("What is a bird?")
        assert third["timings"]["cache_n"] == 0
        assert "model lazy: saved prefixes no longer match it; deleted" in served.server.log()
        assert not saved.exists()
    finally:
        cli_ok(served.state, "model", "edit", "lazy", "--kv-type", "f16")
