"""The usage record: every finished request of every endpoint, and `vergeai usage` over it."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import HELLO, NO_EOS, Server, cli_ok, eventually, free_port, run_cli

from vergeai.service import Service
from vergeai.state.ledger import Filter, Ledger, Record, by_day
from vergeai.state.store import Store


@dataclass
class Env:
    server: Server
    state: Path
    alice: str
    alice_ci: str
    bob: str

    def post(self, token: str, path: str, body: dict[str, Any]) -> httpx.Response:
        with self.server.http(token) as http:
            return http.post(path, json=body)

    def usage(self, *args: str) -> Any:
        return json.loads(cli_ok(self.state, "usage", "--json", *args))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("usage")
    state = root / "state"
    common = ["--model", model_path, "--threads", "2", "--ctx", "512"]
    cli_ok(state, "assistant", "create", "gemma", *common, "--chat-format", "gemma",
           "--parallel", "2")  # fmt: skip
    cli_ok(state, "assistant", "create", "emb", *common, "--embedding")
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    alice = cli_ok(state, "key", "create", "--user", "alice", "--name", "app").strip()
    alice_ci = cli_ok(state, "key", "create", "--user", "alice", "--name", "ci").strip()
    bob = cli_ok(state, "key", "create", "--user", "bob", "--name", "app").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    env = Env(server, state, alice, alice_ci, bob)
    try:
        chat = {
            "model": "gemma",
            "messages": HELLO,
            "max_tokens": 3,
            "temperature": 0,
            "logit_bias": NO_EOS,
        }
        first = env.post(alice, "/v1/chat/completions", chat).json()
        second = env.post(alice, "/v1/chat/completions", chat).json()  # its prompt is cached
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
        env.post(
            alice_ci,
            "/v1/completions",
            {
                "model": "gemma",
                "prompt": "Hi",
                "max_tokens": 2,
                "temperature": 0,
                "logit_bias": NO_EOS,
            },
        )
        env.post(bob, "/v1/embeddings", {"model": "emb", "input": ["a b c", "d e"]})
        env.post(bob, "/v1/chat/completions", {"model": "gemma", "messages": HELLO, "top_p": 7})
        env.post(
            bob,
            "/v1/messages",
            {"model": "gemma", "max_tokens": 2, "messages": HELLO, "temperature": 0},
        )
        env.post(bob, "/v1/chat/completions", {"model": "nobody", "messages": HELLO})
        eventually(lambda: env.usage()[0]["requests"] == 6, timeout=5, what="records written")
        yield env
    finally:
        server.stop()


def test_every_endpoint_is_recorded(env: Env) -> None:
    total = env.usage()[0]
    assert total["requests"] == 6 and total["errors"] == 1  # "nobody" is not an assistant
    by_assistant = {r["assistant"]: r for r in env.usage("--by", "assistant")}
    assert by_assistant["emb"]["requests"] == 1 and by_assistant["emb"]["completion_tokens"] == 0
    assert by_assistant["emb"]["prompt_tokens"] >= 4
    gemma = by_assistant["gemma"]
    assert gemma["requests"] == 5 and gemma["completion_tokens"] == 3 + 3 + 2 + 2
    assert gemma["cached_tokens"] > 0
    assert total["total_tokens"] == total["prompt_tokens"] + total["completion_tokens"]


def test_by_user_and_key(env: Env) -> None:
    users = {r["user"]: r["requests"] for r in env.usage("--by", "user")}
    assert users == {"alice": 3, "bob": 3}
    keys = {r["key"]: r["requests"] for r in env.usage("--by", "key")}
    assert keys == {"app": 5, "ci": 1}  # both users named a key "app"
    assert env.usage("--user", "alice", "--key", "ci")[0]["requests"] == 1
    assert env.usage("--user", "nobody")[0]["requests"] == 0


def test_by_day_and_time_windows(env: Env) -> None:
    today = datetime.now().strftime("%Y-%m-%d")
    days = env.usage("--by", "day")
    assert len(days) == 1 and days[0]["requests"] == 6
    assert env.usage("--since", today, "--until", today)[0]["requests"] == 6
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    assert env.usage("--since", tomorrow)[0]["requests"] == 0
    assert env.usage("--until", "2020-01-01")[0]["requests"] == 0


def test_table_and_csv(env: Env) -> None:
    table = cli_ok(env.state, "usage", "--by", "user")
    assert "alice" in table and "bob" in table and "requests" in table
    rows = list(csv.DictReader(io.StringIO(cli_ok(env.state, "usage", "--by", "key", "--csv"))))
    assert {r["key"] for r in rows} == {"app", "ci"} and int(rows[0]["requests"]) > 0


def test_the_access_log_names_the_key_never_the_token(env: Env) -> None:
    log = env.server.log()
    assert "key=ci" in log and env.alice_ci not in log


@pytest.mark.parametrize(
    "args,words",
    [
        (["--since", "yesterday"], "--since"),
        (["--until", "2026-13-01"], "--until"),
        (["--since", "2026-02-01", "--until", "2026-01-01"], "--until"),
        (["--by", "month"], "--by"),
        (["--csv", "--json"], "--csv"),
    ],
)
def test_bad_options_are_usage_errors(env: Env, args: list[str], words: str) -> None:
    code, _, err = run_cli(env.state, "usage", *args)
    assert code == 2 and words in err


def test_an_empty_record_is_zeros(tmp_path: Path) -> None:
    assert json.loads(cli_ok(tmp_path, "usage", "--json"))[0]["requests"] == 0
    assert json.loads(cli_ok(tmp_path, "usage", "--json", "--by", "user")) == []


def test_old_records_are_pruned(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    old = (datetime.now(UTC) - timedelta(days=500)).isoformat()
    new = datetime.now(UTC).isoformat()
    ledger.write([Record(at, "u", "k", "a", "/v1/x", 200, 5, 0, 1, 1.0, "r") for at in (old, new)])
    assert ledger.prune(400) == 1
    assert ledger.totals(Filter())[0]["requests"] == 1


def test_a_wild_number_is_clamped_and_loses_no_other_record(tmp_path: Path) -> None:
    """An upstream once reported usage of 10^30: SQLite refused the whole batch, and another
    user's records in it were lost; a negative count would credit quotas."""
    ledger = Ledger(tmp_path)
    now = datetime.now(UTC).isoformat()
    good = [Record(now, "bob", "k", "a", "/v1/x", 200, 5, 0, 1, 1.0, f"r{i}") for i in range(10)]
    wild = Record(now, "eve", "k", "a", "/v1/x", 200, 10**30, -7, -(10**30), float("nan"), "w")
    ledger.write([good[0], wild, *good[1:]])
    assert ledger.totals(Filter(user="bob"))[0]["requests"] == 10
    eve = ledger.totals(Filter(user="eve"))[0]
    assert eve["prompt_tokens"] == 2**53 and eve["completion_tokens"] == 0
    assert eve["cached_tokens"] == 0
    assert ledger.tokens_since(datetime.now(UTC) - timedelta(days=1))[("eve", "k")] >= 0


def test_refused_requests_are_counted_in_a_row_a_flush(tmp_path: Path) -> None:
    """A client hammering its limit wrote a usage row per 429: 15,268 rows in 75 s."""
    service = Service(Store(tmp_path))
    now = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()  # a minute not over yet
    for i in range(500):
        service.record(Record(now, "bob", "k", "gemma", "/v1/chat/completions", 429, 0, 0, 0,
                              0.1, f"r{i}"))  # fmt: skip
    service.record(
        Record(now, "bob", "k", "gemma", "/v1/chat/completions", 200, 9, 0, 3, 5.0, "ok")
    )
    service.flush_records()
    totals = Ledger(tmp_path).totals(Filter())[0]
    assert totals["requests"] == 501 and totals["errors"] == 500
    refused = Record(now, "bob", "k", "gemma", "/v1/chat/completions", 429, 0, 0, 0, 0.1, "x")
    for _ in range(100):  # the same minute, after a flush: the first is not written again
        service.record(refused)
    service.flush_records()
    assert Ledger(tmp_path).totals(Filter())[0]["requests"] == 601
    with sqlite3.connect(tmp_path / "usage.db") as db:  # the answered, the first refused, 2 counts
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 4


def test_a_usage_record_from_before_counts_is_upgraded(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "usage.db") as db:
        db.execute(
            "CREATE TABLE requests (at TEXT NOT NULL, user TEXT NOT NULL, key TEXT NOT NULL, "
            "assistant TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL, "
            "prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, "
            "completion_tokens INTEGER NOT NULL, duration_ms REAL NOT NULL, "
            "request_id TEXT NOT NULL)"
        )
        db.execute("INSERT INTO requests VALUES (?, 'u', 'k', 'a', '/v1/x', 200, 5, 0, 1, 1.0, "
                   "'r')", (datetime.now(UTC).isoformat(),))  # fmt: skip
    ledger = Ledger(tmp_path)
    assert ledger.totals(Filter())[0]["requests"] == 1
    ledger.write([Record(datetime.now(UTC).isoformat(), "u", "k", "a", "/v1/x", 429, 0, 0, 0,
                         1.0, "s", requests=4)])  # fmt: skip
    assert ledger.totals(Filter())[0] == {
        "requests": 5, "errors": 4, "prompt_tokens": 5, "cached_tokens": 0,
        "completion_tokens": 1, "total_tokens": 6,
    }  # fmt: skip


def test_a_request_past_midnight_is_recorded_on_both_days(tmp_path: Path) -> None:
    """Tokens generated before 00:00 UTC by a request that finished after it counted all
    to the new day, which a restart then seeded into the new day's quota."""
    at = "2026-02-01T00:00:05+00:00"
    record = Record(at, "u", "k", "a", "/v1/x", 200, 30, 20, 50, 9000.0, "r")
    rows = by_day(record, {"2026-01-31": [30, 40], "2026-02-01": [0, 10]})
    split = [(r.at[:10], r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.requests)
             for r in rows]  # fmt: skip
    assert split == [("2026-01-31", 30, 20, 40, 0), ("2026-02-01", 0, 0, 10, 1)]
    assert by_day(record, {"2026-02-01": [30, 50]}) == [record]
    ledger = Ledger(tmp_path)
    ledger.write(rows)
    days = {row["day"]: row for row in ledger.totals(Filter(), by="day")}
    assert days["2026-01-31"]["total_tokens"] == 70 and days["2026-01-31"]["requests"] == 0
    assert days["2026-02-01"]["total_tokens"] == 10 and days["2026-02-01"]["requests"] == 1
    since = datetime(2026, 2, 1, tzinfo=UTC)
    assert ledger.tokens_since(since) == {("u", "k"): 10}
