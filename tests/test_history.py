"""Chat-history sessions end to end: `vergeai serve` on the real demo model, the openai client.

One server for the module, with an assistant `mem` that remembers sessions
(4 turns kept, 512-token context) and `plain`, the same model without history.
The tests share the server; each makes the sessions it checks, under ids of
its own, so that it passes alone and in any order.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import NO_EOS, Server, cli_ok, error_of, free_port, run_cli

from vergeai.service import Service
from vergeai.state.history import History, SessionKey
from vergeai.state.store import Store

SYSTEM = "You are a helpful assistant."
FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


@dataclass
class Env:
    server: Server
    alice: str
    bob: str

    @property
    def state(self) -> Path:
        return self.server.state_dir


def wait_all_online(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{server.root_url}/health", timeout=1.0)
            if r.status_code == 200 and set(r.json()["assistants"].values()) == {"online"}:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"assistants did not come online:\n{server.log()}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("history")
    state = root / "state"
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2", "--ctx", "512"]
    common += ["--parallel", "2", "--system-prompt", SYSTEM]
    cli_ok(state, "assistant", "create", "mem", *common, "--chat-history", "--history-turns", "4")
    cli_ok(state, "assistant", "create", "plain", *common)
    alice = cli_ok(state, "key", "create", "--user", "alice", "--name", "k").strip()
    bob = cli_ok(state, "key", "create", "--user", "bob", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        wait_all_online(server)
        yield Env(server=server, alice=alice, bob=bob)
    finally:
        server.stop()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


@dataclass
class Call:
    reply: Any  # openai ChatCompletion
    headers: httpx.Headers

    @property
    def text(self) -> str:
        return str(self.reply.choices[0].message.content or "")

    @property
    def prompt_tokens(self) -> int:
        return int(self.reply.usage.prompt_tokens)

    @property
    def session(self) -> dict[str, Any] | None:
        return (self.reply.model_extra or {}).get("session")

    @property
    def timings(self) -> dict[str, Any]:
        return dict((self.reply.model_extra or {})["timings"])


def chat(
    env: Env,
    messages: list[dict[str, str]],
    *,
    model: str = "mem",
    session: str | None = None,
    via: str = "header",
    token: str | None = None,
    max_tokens: int = 4,
) -> Call:
    """One non-streaming call through the openai client; session named by header or body."""
    client = env.server.client(token or env.alice)
    extra: dict[str, Any] = {}
    if session is not None and via == "header":
        extra["extra_headers"] = {"X-Session-ID": session}
    elif session is not None:
        extra["extra_body"] = {"session_id": session}
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        logit_bias=NO_EOS,  # type: ignore[arg-type]
        **extra,
    )
    return Call(raw.parse(), raw.headers)


def post(env: Env, body: dict[str, Any], token: str | None = None, **kw: Any) -> httpx.Response:
    with env.server.http(token or env.alice) as http:
        return http.post("/v1/chat/completions", json=body, **kw)


def session_rows(env: Env, *extra: str, assistant: str = "mem") -> list[dict[str, Any]]:
    rows = json.loads(cli_ok(env.state, "assistant", "sessions", assistant, "--json", *extra))
    assert isinstance(rows, list)
    return rows


def turn_counts(env: Env) -> dict[tuple[str, str], int]:
    return {(r["user"], r["id"]): r["turns"] for r in session_rows(env)}


def stored(env: Env, session: str, who: str = "alice") -> list[list[dict[str, str]]]:
    return History(env.state).turns(SessionKey(who, "mem", session), 30)


def fresh_prompt_tokens(env: Env, text: str) -> int:
    """The prompt size of a one-message conversation, with no history."""
    return chat(env, [user(text)], model="plain", max_tokens=1).prompt_tokens


# 1. memory


def test_a_fact_told_in_call_one_is_in_the_prompt_of_call_two(env: Env) -> None:
    one = chat(env, [user("My name is Zanzibar.")], session="s1")
    assert one.session == {"id": "s1", "turns_used": 0, "turns_dropped": 0}
    assert one.headers["x-session-id"] == "s1"
    a1 = one.text
    assert a1
    two = chat(env, [user("What is my name?")], session="s1")
    assert two.session == {"id": "s1", "turns_used": 1, "turns_dropped": 0}
    explicit = chat(
        env,
        [
            user("My name is Zanzibar."),
            {"role": "assistant", "content": a1},
            user("What is my name?"),
        ],
        model="plain",
    )
    assert explicit.session is None
    assert two.prompt_tokens == explicit.prompt_tokens
    assert two.prompt_tokens > one.prompt_tokens + 5
    # the KV cache of call one is reused: only the new tokens are evaluated
    timings = two.timings
    assert timings["cache_n"] >= one.prompt_tokens - 1
    assert timings["cache_n"] + timings["prompt_n"] == two.prompt_tokens
    # what is stored: the user message and the answer, as one turn; no system prompt
    assert stored(env, "s1") == [
        [user("My name is Zanzibar."), {"role": "assistant", "content": a1}],
        [user("What is my name?"), {"role": "assistant", "content": two.text}],
    ]


def test_a_clients_own_system_message_stays_before_the_history(env: Env) -> None:
    system = {"role": "system", "content": "Answer in French."}
    one = chat(env, [system, user("I live in Lyon.")], session="sys")
    two = chat(env, [system, user("Where do I live?")], session="sys")
    assert two.session is not None and two.session["turns_used"] == 1
    explicit = chat(
        env,
        [
            system,
            user("I live in Lyon."),
            {"role": "assistant", "content": one.text},
            user("Where do I live?"),
        ],
        model="plain",
    )
    assert two.prompt_tokens == explicit.prompt_tokens
    # the client's system message is not history
    assert [m["role"] for turn in stored(env, "sys") for m in turn] == ["user", "assistant"] * 2


def test_a_streamed_call_is_remembered_and_its_last_chunk_names_the_session(env: Env) -> None:
    client = env.server.client(env.alice)
    for include_usage in (False, True):
        chunks = list(
            client.chat.completions.create(
                model="mem",
                messages=[user(f"Streaming, usage {include_usage}.")],
                max_tokens=4,
                logit_bias=NO_EOS,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": include_usage},
                extra_body={"session_id": "stream"},
            )
        )
        sessions = [(c.model_extra or {}).get("session") for c in chunks]
        assert sessions[:-1] == [None] * (len(chunks) - 1)
        assert sessions[-1] == {
            "id": "stream",
            "turns_used": int(include_usage),
            "turns_dropped": 0,
        }
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert stored(env, "stream")[-1] == [
            user(f"Streaming, usage {include_usage}."),
            {"role": "assistant", "content": text},
        ]


# 2. naming a session


def test_header_and_body_name_the_same_session(env: Env) -> None:
    a = chat(env, [user("One.")], session="both", via="header")
    b = chat(env, [user("Two.")], session="both", via="body")
    assert a.headers["x-session-id"] == b.headers["x-session-id"] == "both"
    assert a.session is not None and a.session["turns_used"] == 0
    assert b.session is not None and b.session["turns_used"] == 1
    same = post(
        env,
        {"model": "mem", "messages": [user("Three.")], "max_tokens": 2, "session_id": "both"},
        headers={"X-Session-ID": "both"},
    )
    assert same.status_code == 200
    assert same.headers["x-session-id"] == "both"
    assert same.json()["session"]["turns_used"] == 2
    assert turn_counts(env)[("alice", "both")] == 3


def test_every_allowed_character_up_to_128_makes_a_session_id(env: Env) -> None:
    longest = ("Az09._:@-" * 15)[:128]
    call = chat(env, [user("Hi.")], session=longest)
    assert call.headers["x-session-id"] == longest
    assert call.session is not None and call.session["id"] == longest
    assert turn_counts(env)[("alice", longest)] == 1


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    return error_of(response)


def test_header_and_body_naming_different_sessions_is_400(env: Env) -> None:
    before = session_rows(env)
    response = post(
        env,
        {"model": "mem", "messages": [user("x")], "max_tokens": 2, "session_id": "left"},
        headers={"X-Session-ID": "right"},
    )
    err = _error(response)
    assert err["param"] == "session_id" and err["type"] == "invalid_request_error"
    assert session_rows(env) == before


@pytest.mark.parametrize("bad", ["a b", "x" * 129, "x" * 200, "", "a/b", "ü", "s1\n"])
def test_bad_session_ids_are_400_and_store_nothing(env: Env, bad: str) -> None:
    before = session_rows(env)
    body = {"model": "mem", "messages": [user("x")], "max_tokens": 2}
    err = _error(post(env, {**body, "session_id": bad}))
    assert err["param"] == "session_id"
    if bad.isascii() and "\n" not in bad:  # what an HTTP header can carry
        err = _error(post(env, body, headers={"X-Session-ID": bad}))
        assert err["param"] == "session_id"
    assert session_rows(env) == before


@pytest.mark.parametrize("bad", [5, True, ["s1"], {"id": "s1"}, 1.5])
def test_non_string_session_ids_are_400(env: Env, bad: Any) -> None:
    before = session_rows(env)
    body = {"model": "mem", "messages": [user("x")], "max_tokens": 2, "session_id": bad}
    assert _error(post(env, body))["param"] == "session_id"
    assert session_rows(env) == before


def test_openai_client_sees_bad_session_as_bad_request(env: Env) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(env, [user("x")], session="no spaces please")
    assert caught.value.status_code == 400


# 3. isolation


def test_another_user_with_the_same_session_id_sees_an_empty_session(env: Env) -> None:
    chat(env, [user("My name is Zanzibar.")], session="shared")
    chat(env, [user("What is my name?")], session="shared")
    alices = stored(env, "shared")
    assert len(alices) == 2
    question = "What is my name?"
    bobs = chat(env, [user(question)], session="shared", token=env.bob)
    assert bobs.session == {"id": "shared", "turns_used": 0, "turns_dropped": 0}
    assert bobs.prompt_tokens == fresh_prompt_tokens(env, question)
    assert stored(env, "shared", who="bob") == [
        [user(question), {"role": "assistant", "content": bobs.text}]
    ]
    assert stored(env, "shared") == alices  # alice's is untouched
    counts = turn_counts(env)
    assert counts[("bob", "shared")] == 1 and counts[("alice", "shared")] == 2


# 4. stateless calls


def test_no_session_id_is_stateless(env: Env) -> None:
    before = session_rows(env)
    for _ in range(2):
        call = chat(env, [user("Remember nothing.")])
        assert call.session is None
        assert "x-session-id" not in call.headers
        assert call.prompt_tokens == fresh_prompt_tokens(env, "Remember nothing.")
    assert session_rows(env) == before


def test_an_assistant_without_history_echoes_the_session_but_keeps_nothing(env: Env) -> None:
    for via in ("header", "body"):
        call = chat(env, [user("Hello there.")], model="plain", session="s1", via=via)
        assert call.headers["x-session-id"] == "s1"
        assert call.session is None
        assert call.prompt_tokens == fresh_prompt_tokens(env, "Hello there.")
    assert session_rows(env, assistant="plain") == []
    assert History(env.state).sessions("plain") == []


# 5. failed and disconnected calls


def test_failed_and_disconnected_calls_store_nothing(env: Env) -> None:
    first = chat(env, [user("Start of a fragile session.")], session="fragile")
    assert first.session is not None and first.session["turns_used"] == 0
    assert turn_counts(env)[("alice", "fragile")] == 1
    headers = {"X-Session-ID": "fragile"}
    # rejected before generation: a bad field, a prompt that cannot fit the context
    bad = {"model": "mem", "messages": [user("x")], "temperature": "hot"}
    assert _error(post(env, bad, headers=headers))["param"] == "temperature"
    huge = {"model": "mem", "messages": [user("hello " * 3000)], "max_tokens": 2}
    assert _error(post(env, huge, headers=headers))["type"] == "exceed_context_size_error"
    assert _error(post(env, {**huge, "stream": True}, headers=headers))
    assert turn_counts(env)[("alice", "fragile")] == 1
    # a stream dropped after a few chunks, and a whole answer the client stopped waiting for
    long = {"model": "mem", "messages": [user("Talk for a long time.")], "max_tokens": 500,
            "logit_bias": NO_EOS}  # fmt: skip
    with (
        env.server.http(env.alice) as http,
        http.stream(
            "POST", "/v1/chat/completions", json={**long, "stream": True}, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    with (
        httpx.Client(base_url=env.server.root_url, timeout=1.0) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(
            "/v1/chat/completions",
            json=long,
            headers={**headers, "Authorization": f"Bearer {env.alice}"},
        )
    time.sleep(1.0)
    assert turn_counts(env)[("alice", "fragile")] == 1
    # the session is free at once (no lease left behind), and still holds one turn
    start = time.monotonic()
    after = chat(env, [user("Still there?")], session="fragile")
    assert time.monotonic() - start < 5
    assert after.session == {"id": "fragile", "turns_used": 1, "turns_dropped": 0}
    assert [t[0] for t in stored(env, "fragile")] == [
        user("Start of a fragile session."),
        user("Still there?"),
    ]


# 6. concurrency


def test_concurrent_calls_in_one_session_are_serialized(env: Env) -> None:
    results: dict[int, Call] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = chat(env, [user(f"Note {i}: the number is {i * 7}.")], session="conc")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    # each call saw all the turns stored before it: one after the other
    order = sorted(results, key=lambda i: results[i].session["turns_used"])  # type: ignore[index]
    assert [results[i].session["turns_used"] for i in order] == [0, 1, 2, 3]  # type: ignore[index]
    turns = stored(env, "conc")
    assert turns == [
        [
            user(f"Note {i}: the number is {i * 7}."),
            {"role": "assistant", "content": results[i].text},
        ]
        for i in order
    ]
    assert turn_counts(env)[("alice", "conc")] == 4


# 7. trimming


def test_history_beyond_the_context_drops_the_oldest_whole_turns(env: Env) -> None:
    seen: list[dict[str, Any]] = []
    for i in range(5):
        message = user(f"Part {i}. " + FILLER * 9)
        before = stored(env, "long")
        call = chat(env, [message], session="long")
        assert call.session is not None
        used, dropped = call.session["turns_used"], call.session["turns_dropped"]
        assert used + dropped == len(before) == i
        assert call.prompt_tokens < 512
        if i == 0:
            assert call.prompt_tokens >= 150  # the messages are long enough to overflow
        if dropped:
            # the system prompt, the newest turns that fit, and the new message
            kept = [m for turn in before[dropped:] for m in turn]
            explicit = chat(env, [*kept, message], model="plain", max_tokens=1)
            assert call.prompt_tokens == explicit.prompt_tokens
        seen.append(call.session)
    assert seen[-1]["turns_dropped"] > 0 and seen[-1]["turns_used"] <= 2
    assert turn_counts(env)[("alice", "long")] == 4  # --history-turns 4
    assert [t[0]["content"][:7] for t in stored(env, "long")] == [
        "Part 1.",
        "Part 2.",
        "Part 3.",
        "Part 4.",
    ]


# 8. storage


def test_history_survives_a_restart(env: Env) -> None:
    chat(env, [user("My name is Zanzibar.")], session="restart")
    chat(env, [user("I live in Lyon.")], session="restart")
    env.server.stop()
    env.server.start()
    wait_all_online(env.server)
    call = chat(env, [user("Do you still know my name?")], session="restart")
    assert call.session == {"id": "restart", "turns_used": 2, "turns_dropped": 0}
    assert turn_counts(env)[("alice", "restart")] == 3


def test_history_db_is_private_and_in_wal_mode(env: Env) -> None:
    chat(env, [user("Hello.")], session="private")
    path = env.state / "history.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _age(env: Env, session: str, days: int) -> None:
    when = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    with sqlite3.connect(env.state / "history.db") as db:
        db.execute(
            "UPDATE sessions SET last_used=? WHERE user='alice' AND assistant='mem' AND session=?",
            (when, session),
        )


def test_an_idle_session_expires_after_history_days(env: Env) -> None:
    chat(env, [user("An old memory.")], session="old")
    _age(env, session="old", days=20)  # within the default 30 days: kept
    kept = chat(env, [user("Still here?")], session="old")
    assert kept.session is not None and kept.session["turns_used"] == 1
    _age(env, session="old", days=31)
    gone = chat(env, [user("And now?")], session="old")
    assert gone.session == {"id": "old", "turns_used": 0, "turns_dropped": 0}
    assert stored(env, "old") == [[user("And now?"), {"role": "assistant", "content": gone.text}]]


# 10. switching chat history off and on


def _poll(env: Env, want_session: bool) -> None:
    """Wait for the server to apply an edit; a call started 2 s after it must show it.

    Probes use their own session, so that calls made before the change
    reaches the server leave the session under test alone.
    """
    deadline = time.monotonic() + 2.0
    while True:
        started = time.monotonic()
        call = chat(env, [user("Probe.")], session="probe", max_tokens=1)
        if (call.session is not None) == want_session:
            return
        assert started < deadline, "the edit did not reach the server within 2 s"
        time.sleep(0.1)


def test_disabling_chat_history_keeps_the_sessions(env: Env) -> None:
    chat(env, [user("Keep this in mind.")], session="toggle")
    cli_ok(env.state, "assistant", "edit", "mem", "--no-chat-history")
    try:
        _poll(env, want_session=False)
        before = turn_counts(env)
        assert before[("alice", "toggle")] == 1
        off = chat(env, [user("Are you listening?")], session="toggle")
        assert off.session is None
        assert off.headers["x-session-id"] == "toggle"
        assert off.prompt_tokens == fresh_prompt_tokens(env, "Are you listening?")
        assert turn_counts(env) == before  # kept, and nothing added while off
    finally:
        cli_ok(env.state, "assistant", "edit", "mem", "--chat-history")
    _poll(env, want_session=True)
    on = chat(env, [user("And now?")], session="toggle")
    assert on.session == {"id": "toggle", "turns_used": 1, "turns_dropped": 0}
    assert turn_counts(env)[("alice", "toggle")] == 2


# 9. the CLI


def test_cli_sessions_lists_and_filters(env: Env) -> None:
    chat(env, [user("One.")], session="listed")
    chat(env, [user("Two.")], session="listed")
    chat(env, [user("Three.")], session="listed-bob", token=env.bob)
    rows = session_rows(env)
    mine = {(r["user"], r["id"]): r["turns"] for r in rows}
    assert mine[("alice", "listed")] == 2 and mine[("bob", "listed-bob")] == 1
    for r in rows:
        assert set(r) == {"id", "user", "turns", "tokens", "last_used"}
        assert r["turns"] > 0 and r["tokens"] > 0
        assert isinstance(r["last_used"], str) and r["last_used"]
    assert [r["last_used"] for r in rows] == sorted((r["last_used"] for r in rows), reverse=True)
    bobs = session_rows(env, "--user", "bob")
    assert bobs == [r for r in rows if r["user"] == "bob"]
    assert ("bob", "listed-bob") in {(r["user"], r["id"]) for r in bobs}
    assert session_rows(env, "--user", "nobody") == []
    table = cli_ok(env.state, "assistant", "sessions", "mem")
    assert "listed-bob" in table and "alice" in table and "bob" in table
    code, out, err = run_cli(env.state, "assistant", "sessions", "ghost", "--json")
    assert code == 1 and out == "" and "ghost" in err


def test_cli_clear_history(env: Env) -> None:
    for session, token in (("clear-1", env.alice), ("clear-2", env.alice), ("clear-1", env.bob)):
        chat(env, [user("Remember me.")], session=session, token=token)
    chat(env, [user("And this.")], session="clear-1")
    before = turn_counts(env)
    assert before[("alice", "clear-1")] == 2
    assert before[("alice", "clear-2")] == before[("bob", "clear-1")] == 1
    cli_ok(env.state, "assistant", "clear-history", "mem", "--session", "clear-1",
           "--user", "alice")  # fmt: skip
    after = turn_counts(env)
    assert after == {k: v for k, v in before.items() if k != ("alice", "clear-1")}
    # the server sees the cleared session at once
    call = chat(env, [user("Who am I?")], session="clear-1")
    assert call.session is not None and call.session["turns_used"] == 0
    # clearing a session that is not there fails
    code, _, err = run_cli(env.state, "assistant", "clear-history", "mem", "--session", "zzz")
    assert code == 1 and "zzz" in err
    # clearing everything asks first; no answer means no
    before = turn_counts(env)
    code, _, _ = run_cli(env.state, "assistant", "clear-history", "mem")
    assert code == 1
    assert turn_counts(env) == before
    code, _, _ = run_cli(env.state, "assistant", "clear-history", "mem", input="n\n")
    assert code == 1
    assert turn_counts(env) == before
    # usage errors and unknown assistants
    for bad in ("a b", "x" * 200, "", "s1\n"):
        code, _, _ = run_cli(env.state, "assistant", "clear-history", "mem", "--session", bad)
        assert code == 2
    code, _, err = run_cli(env.state, "assistant", "clear-history", "ghost", "--yes")
    assert code == 1 and "ghost" in err
    assert turn_counts(env) == before
    # one user's sessions, then all
    cli_ok(env.state, "assistant", "clear-history", "mem", "--user", "bob", "--yes")
    assert turn_counts(env) == {k: v for k, v in before.items() if k[0] != "bob"}
    cli_ok(env.state, "assistant", "clear-history", "mem", "--yes")
    assert session_rows(env) == []
    call = chat(env, [user("Anyone?")], session="conc")
    assert call.session == {"id": "conc", "turns_used": 0, "turns_dropped": 0}


def test_no_tracebacks_and_no_tokens_in_the_log(env: Env) -> None:
    """Each user's token in a remembered call, a stateless one and a refused one."""
    marks = []
    for token in (env.alice, env.bob):
        for extra, status in (({"session_id": "logged"}, 200), ({}, 200),
                              ({"session_id": "not valid"}, 400)):  # fmt: skip
            marks.append(f"history-{uuid.uuid4().hex[:12]}")
            body = {"model": "mem", "messages": [user("Hi.")], "max_tokens": 2, **extra}
            response = post(env, body, token, headers={"X-Request-ID": marks[-1]})
            assert response.status_code == status, response.text
    for mark in marks:  # the access lines are written after the answers were sent
        log = env.server.wait_logged(f"request_id={mark}")
    assert "Traceback" not in log
    assert env.alice not in log and env.bob not in log


def test_a_history_db_from_before_tool_calls_is_upgraded_in_place(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "history.db")
    old.executescript("""
        CREATE TABLE sessions (user TEXT NOT NULL, assistant TEXT NOT NULL,
            session TEXT NOT NULL, last_used TEXT NOT NULL,
            next_turn INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user, assistant, session));
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL,
            assistant TEXT NOT NULL, session TEXT NOT NULL, turn INTEGER NOT NULL,
            role TEXT NOT NULL, content TEXT NOT NULL, tokens INTEGER NOT NULL);
    """)  # fmt: skip
    now = datetime.now(UTC).isoformat()
    old.execute("INSERT INTO sessions VALUES ('u', 'a', 's', ?, 1)", (now,))
    old.execute("INSERT INTO messages (user, assistant, session, turn, role, content, tokens) "
                "VALUES ('u', 'a', 's', 0, 'user', 'hi', 2)")  # fmt: skip
    old.commit()
    old.close()
    history, key = History(tmp_path), SessionKey("u", "a", "s")
    assert history.turns(key, 30) == [[{"role": "user", "content": "hi"}]]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = [({"role": "assistant", "content": "", "tool_calls": [call]}, 5),
            ({"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}, 3)]  # fmt: skip
    history.append(key, turn, 10)
    assert history.turns(key, 30)[1] == [message for message, _ in turn]
    with sqlite3.connect(tmp_path / "history.db") as db:  # sizes kept from before, and since
        size = len("hi") + sum(len(m["content"]) + len(json.dumps(
            {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if k in m}))
            for m, _ in turn)  # fmt: skip
        assert db.execute("SELECT size FROM sessions").fetchone()[0] == size


def test_one_users_sessions_are_held_to_their_share_oldest_first(tmp_path: Path) -> None:
    """Sessions expired only when read, and a user could keep any number of them."""
    history = History(tmp_path, per_user=2400)
    turn = [({"role": "user", "content": "x" * 500}, 1), ({"role": "assistant", "content": "y"}, 1)]
    for session in ("s1", "s2", "s3"):
        history.append(SessionKey("u", "a", session), turn, 10)
    history.append(SessionKey("v", "a", "s1"), turn, 10)  # another user's share is its own
    history.append(SessionKey("u", "a", "s1"), turn, 10)  # s1 is used again
    history.append(SessionKey("u", "a", "s4"), turn, 10)  # 5 turns of 501: s2 goes
    assert [s["id"] for s in history.sessions("a", "u")] == ["s4", "s1", "s3"]
    big = SessionKey("u", "a", "big")
    for _ in range(7):  # one session over the share alone keeps its newest turns
        history.append(big, turn, 10)
    assert [s["id"] for s in history.sessions("a", "u")] == ["big"]
    assert len(history.turns(big, 30)) == 4
    assert [s["id"] for s in history.sessions("a", "v")] == ["s1"]


def test_idle_sessions_and_those_of_gone_users_and_assistants_are_pruned(
    tmp_path: Path,
) -> None:
    history = History(tmp_path)
    turn = [({"role": "user", "content": "hi"}, 1)]
    for user, assistant, session in (("u", "a", "s"), ("u", "a", "idle"), ("gone", "a", "s"),
                                     ("u", "retired", "s")):  # fmt: skip
        history.append(SessionKey(user, assistant, session), turn, 10)
    with sqlite3.connect(tmp_path / "history.db") as db:
        old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
        db.execute("UPDATE sessions SET last_used=? WHERE session='idle'", (old,))
    assert history.prune({"a": 30}, {"u"}) == 3
    assert [s["id"] for s in history.sessions("a")] == ["s"]
    with sqlite3.connect(tmp_path / "history.db") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1


def test_the_server_prunes_sessions_with_the_other_stores(tmp_path: Path) -> None:
    History(tmp_path).append(SessionKey("u", "a", "s"), [({"role": "user", "content": "hi"}, 1)], 9)
    Service(Store(tmp_path)).prune_stores(400)  # no user u, no assistant a
    assert History(tmp_path).sessions("a") == []
