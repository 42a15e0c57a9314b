"""The usage record: every finished request of every endpoint, and `vergeai usage` over it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import HELLO, NO_EOS, Server, cli_ok, eventually, free_port, run_cli

from vergeai.state.ledger import Filter, Ledger, Record


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
