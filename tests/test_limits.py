"""Limits on users and keys, enforced by a real server under concurrent clients."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
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

RATE_HEADERS = {
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
}  # fmt: skip
TOKEN_HEADERS = {
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
}  # fmt: skip
CHAT = {"model": "gemma", "messages": HELLO, "max_tokens": 2, "temperature": 0}


@dataclass
class Env:
    server: Server
    state: Path
    tokens: dict[str, str]  # key name -> token

    def post(self, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
        with self.server.http(self.tokens[key]) as http:
            return http.post(path, json=body)

    def chat(self, key: str, **fields: Any) -> httpx.Response:
        return self.post(key, "/v1/chat/completions", {**CHAT, **fields})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("limits")
    state = root / "state"
    common = ["--model", model_path, "--threads", "2", "--ctx", "512"]
    cli_ok(state, "assistant", "create", "gemma", *common, "--chat-format", "gemma",
           "--parallel", "4")  # fmt: skip
    cli_ok(state, "assistant", "create", "emb", *common, "--embedding")
    cli_ok(state, "user", "create", "root", "--role", "admin")
    cli_ok(state, "user", "create", "app")
    cli_ok(state, "user", "create", "team", "--rpm", "3")
    cli_ok(state, "user", "create", "other")
    keys = {
        "admin": ("root", []),
        "burst": ("app", ["--rpm", "6"]),
        "conc": ("app", ["--max-concurrent", "2"]),
        "tok": ("app", ["--tpm", "120"]),
        "quota": ("app", ["--daily-tokens", "40"]),
        "narrow": ("app", ["--assistants", "emb", "--tpm", "50"]),
        "a": ("team", []),
        "b": ("team", []),
        "free": ("other", []),
        "counting": ("other", ["--rpm", "2"]),
        "single": ("other", ["--max-concurrent", "1"]),
    }
    tokens = {
        name: cli_ok(state, "key", "create", "--user", user, "--name", name, *opts).strip()
        for name, (user, opts) in keys.items()
    }
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    try:
        yield Env(server, state, tokens)
    finally:
        server.stop()


def refusal(response: httpx.Response, code: str = "rate_limit_exceeded") -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = error_of(response)
    assert error["code"] == error["type"] == code, error
    return error


async def _fire(env: Env, key: str, n: int) -> list[Any]:
    """n chat requests at once from n clients (no retries); each raw response or error."""
    http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64))
    client = openai.AsyncOpenAI(
        base_url=env.server.base_url, api_key=env.tokens[key], max_retries=0, http_client=http
    )

    async def one() -> Any:
        try:
            return await client.chat.completions.with_raw_response.create(**CHAT)
        except openai.APIError as exc:
            return exc

    async with http:
        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_32_clients_on_a_key_limited_to_6_requests_a_minute(env: Env) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        limited, free = await asyncio.gather(_fire(env, "burst", 32), _fire(env, "free", 4))
        return limited, free

    limited, free = asyncio.run(both())
    ok = [r for r in limited if not isinstance(r, openai.APIError)]
    refused = [r for r in limited if isinstance(r, openai.RateLimitError)]
    assert len(ok) == 6 and len(refused) == 26, limited  # no over-admission
    for r in ok:
        assert r.parse().choices[0].message.content
        assert r.headers["x-ratelimit-limit-requests"] == "6"
        assert int(r.headers["x-ratelimit-remaining-requests"]) <= 5
    for exc in refused:
        headers = exc.response.headers
        assert exc.code == "rate_limit_exceeded" and exc.type == "rate_limit_exceeded"
        assert "requests per minute" in exc.message and "key 'burst'" in exc.message
        assert 1 <= int(headers["retry-after"]) <= 60
        assert 0 < int(headers["retry-after-ms"]) <= 60_000
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
    # another user's key is neither refused nor told about limits it does not have
    assert not any(isinstance(r, openai.APIError) for r in free), free
    assert not any(RATE_HEADERS & set(r.headers) for r in free)

    # every endpoint that runs a model answers the limit, in its own shape
    refusal(env.post("burst", "/v1/completions", {"model": "gemma", "prompt": "Hi"}))
    refusal(env.post("burst", "/v1/responses", {"model": "gemma", "input": "Hi"}))
    with env.server.http() as http:
        r = http.post(
            "/v1/messages",
            headers={"x-api-key": env.tokens["burst"], "anthropic-version": "2023-06-01"},
            json={"model": "gemma", "max_tokens": 2, "messages": HELLO},
        )
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    assert int(r.headers["retry-after"]) >= 1
    # what does not run a model is not refused, but still tells the key where it stands
    with env.server.http(env.tokens["burst"]) as http:
        models = http.get("/v1/models")
    assert models.status_code == 200
    assert models.headers["x-ratelimit-remaining-requests"] == "0"

    # the operator sees it: the access log names the key, the record and the metrics count it
    log = env.server.wait_logged("/v1/chat/completions 429 assistant=gemma user=app key=burst")
    assert env.tokens["burst"] not in log
    admin = env.server.http(env.tokens["admin"])
    metrics = admin.get("/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("vergeai:requests_limited_total"))
    assert 'reason="requests"' in metrics
    counts = {
        x.split('"')[1]: float(x.split()[-1])
        for x in metrics.splitlines()
        if x.startswith("vergeai:requests_limited_total{")
    }
    assert counts["requests"] >= 29 and set(counts) >= {"tokens", "concurrency", "daily_quota"}, (
        line
    )
    workers = json.loads(cli_ok(env.state, "workers", "--json"))
    assert workers["helper"]["requests_limited"]["requests"] >= 29
    assert "refused for limits" in cli_ok(env.state, "workers")

    def recorded() -> bool:
        rows = json.loads(cli_ok(env.state, "usage", "--key", "burst", "--json"))
        return bool(rows) and rows[0]["requests"] >= 32 and rows[0]["errors"] >= 26

    eventually(recorded, 3, "the refused requests in the usage record")

    # lifting the limit applies live, within 2 s
    cli_ok(env.state, "key", "edit", "burst", "--rpm", "none")
    eventually(lambda: env.chat("burst").status_code == 200, 2.5, "the limit lifted")
    assert not RATE_HEADERS & set(env.chat("burst").headers)


async def _saturate(env: Env, key: str, clients: int, streams: int) -> dict[str, Any]:
    """Clients streaming in a loop until `streams` streams are done; when each one's tokens were
    received. (A count, not a time window: a busy machine runs fewer streams per second.)"""
    spans: list[tuple[float, float]] = []
    refused = 0
    body = {**CHAT, "max_tokens": 6, "logit_bias": NO_EOS, "stream": True}
    headers = {"Authorization": f"Bearer {env.tokens[key]}"}
    failsafe = time.monotonic() + 300
    async with httpx.AsyncClient(
        base_url=env.server.root_url, headers=headers, timeout=60,
        limits=httpx.Limits(max_connections=64),
    ) as http:  # fmt: skip

        async def client() -> None:
            nonlocal refused
            while len(spans) < streams:
                assert time.monotonic() < failsafe, f"{len(spans)} of {streams} streams done"
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code == 429:
                        await r.aread()
                        refusal(r)
                        refused += 1
                        # as a well-behaved client: wait as told, spread out
                        wait = int(r.headers["retry-after-ms"]) / 1000
                        await asyncio.sleep(random.uniform(0.05, wait))
                        continue
                    assert r.status_code == 200
                    first = last = None
                    async for line in r.aiter_lines():
                        if '"content":"' in line:  # a token, received
                            first = first or time.monotonic()
                            last = time.monotonic()
                    assert first is not None and last is not None
                    spans.append((first, last))

        await asyncio.gather(*(client() for _ in range(clients)))
    return {"spans": spans, "refused": refused}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: e)
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_32_clients_on_a_key_limited_to_2_at_once(env: Env) -> None:
    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        limited = _saturate(env, "conc", 32, 6)
        free = _saturate(env, "free", 1, 2)
        return await asyncio.gather(limited, free)

    limited, free = asyncio.run(both())
    assert most_at_once(limited["spans"]) <= 2, limited["spans"]
    assert len(limited["spans"]) >= 4 and limited["refused"] > 0
    assert free["refused"] == 0 and len(free["spans"]) >= 2  # the other key is unaffected


def test_tokens_per_minute(env: Env) -> None:
    first = env.chat("tok", max_tokens=5, logit_bias=NO_EOS)
    used = first.json()["usage"]["total_tokens"]
    assert first.headers["x-ratelimit-limit-tokens"] == "120"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 120 - used
    assert not RATE_HEADERS & set(first.headers)  # no requests-per-minute limit: no such headers
    # a prompt larger than the whole limit can never pass: no point retrying
    big = env.chat("tok", messages=[{"role": "user", "content": "word " * 200}])
    assert "Request too large" in refusal(big)["message"]
    assert big.headers["x-should-retry"] == "false" and "retry-after" not in big.headers
    # a stream that crosses the limit is allowed to finish; the next request waits
    with env.server.http(env.tokens["tok"]) as http, http.stream(
        "POST", "/v1/chat/completions",
        json={**CHAT, "max_tokens": 100, "logit_bias": NO_EOS, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as r:  # fmt: skip
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 100
    after = env.chat("tok")
    error = refusal(after)
    assert "tokens per minute" in error["message"] and "key 'tok'" in error["message"]
    assert 1 <= int(after.headers["retry-after"]) <= 61
    assert after.headers["x-ratelimit-remaining-tokens"] == "0"


def test_counting_tokens_counts_against_requests_per_minute(env: Env) -> None:
    count = {"model": "gemma", "messages": [{"role": "user", "content": "word " * 2000}]}
    first, second, third = (env.post("counting", "/v1/messages/count_tokens", count)
                            for _ in range(3))  # fmt: skip
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["input_tokens"] > 2000
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"


def test_a_queued_stream_whose_client_left_frees_its_place_at_once(env: Env) -> None:
    """Every slot busy: a max_concurrent 1 key's stream waits; its client gives up; the
    key's next request is admitted at once, not when a slot would have freed."""
    busy = [BackgroundStream(env.server.root_url, env.tokens["free"], "gemma", 150)
            for _ in range(4)]  # fmt: skip
    for stream in busy:
        stream.start()
    body = {**CHAT, "stream": True}
    waiting = httpx.Timeout(60, read=0.5)  # no first token comes while the slots are busy
    with env.server.http(env.tokens["single"]) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=waiting)

    def admitted() -> bool:
        with env.server.http(env.tokens["single"]) as http:
            try:
                response = http.post("/v1/chat/completions", json=body, timeout=waiting)
            except httpx.ReadTimeout:
                return True  # admitted, waiting for a slot in its turn
            return response.status_code != 429

    eventually(admitted, timeout=3, what="the key's place freed")
    assert any(s.thread.is_alive() for s in busy), "the slots freed first: this proved nothing"
    for stream in busy:
        assert stream.completed()


def test_a_users_limit_binds_all_its_keys(env: Env) -> None:
    assert [env.chat(k).status_code for k in ("a", "a", "b")] == [200, 200, 200]
    for key in ("a", "b"):
        r = env.chat(key)
        assert "user 'team'" in refusal(r)["message"]
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    rows = json.loads(cli_ok(env.state, "key", "list", "--user", "team", "--json"))
    assert [r["effective_limits"] for r in rows] == [{"rpm": 3}, {"rpm": 3}]


def test_a_key_narrowed_to_some_assistants(env: Env) -> None:
    r = env.chat("narrow")
    assert r.status_code == 403 and "key 'narrow' may not use assistant 'gemma'" in r.text
    with env.server.http(env.tokens["narrow"]) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["emb"]
    # embeddings count their input tokens against the token limit
    ok = env.post("narrow", "/v1/embeddings", {"model": "emb", "input": "a few words"})
    n = ok.json()["usage"]["prompt_tokens"]
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 50 - n
    big = env.post("narrow", "/v1/embeddings", {"model": "emb", "input": "word " * 60})
    assert "Request too large" in refusal(big)["message"]


def test_a_daily_quota_survives_a_restart_and_clears_live(env: Env) -> None:
    statuses = []
    for _ in range(4):
        r = env.chat("quota", max_tokens=3, logit_bias=NO_EOS)
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    error = refusal(r, "insufficient_quota")
    assert "daily quota of 40 tokens" in error["message"]
    assert r.headers["x-should-retry"] == "false"
    assert not (RATE_HEADERS | TOKEN_HEADERS) & set(r.headers)  # a quota is not a rate
    with pytest.raises(openai.RateLimitError) as info:
        env.server.client(env.tokens["quota"]).chat.completions.create(**CHAT)
    assert info.value.code == "insufficient_quota"

    env.server.stop()
    env.server.start(timeout=120)
    refusal(env.chat("quota"), "insufficient_quota")  # counted from the usage record

    cli_ok(env.state, "key", "edit", "quota", "--daily-tokens", "none")
    eventually(lambda: env.chat("quota").status_code == 200, 2.5, "the quota lifted")


def test_limits_from_the_cli_refuse_bad_values(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "u", "--rpm", "10")
    cli_ok(state, "key", "create", "--user", "u", "--name", "k")
    for args in (
        ["user", "create", "v", "--rpm", "0"],
        ["user", "create", "v", "--tpm", "-5"],
        ["user", "create", "v", "--max-concurrent", "two"],
        ["user", "create", "v", "--daily-tokens", "1.5"],
        ["user", "create", "v", "--rpm", "none"],  # nothing to clear yet
        ["user", "edit", "u", "--monthly-tokens", str(10**16)],
        ["key", "create", "--user", "u", "--name", "k2", "--rpm", "0"],
        ["key", "create", "--user", "u", "--name", "k2", "--assistants", "../x"],
        ["key", "create", "--user", "u", "--name", "k2", "--assistants", ","],
        ["key", "edit", "k"],  # nothing to change
        ["key", "edit", "k", "--expires", "soon"],
        ["key", "edit", "k", "--tpm", "1e9"],
    ):
        code, _, err = run_cli(state, *args)
        assert code == 2, (args, err)
    for args, message in (
        (["key", "edit", "nope", "--rpm", "1"], "no key named 'nope'"),
        (["key", "edit", "k", "--user", "v", "--rpm", "1"], "no key named 'k' for user 'v'"),
        (["key", "edit", "k", "--expires", "2000-01-01"], "in the past"),
    ):
        code, _, err = run_cli(state, *args)
        assert code == 1 and message in err, (args, err)
    before = {f: (state / f).read_bytes() for f in ("users.toml", "keys.toml")}
    cli_ok(state, "key", "revoke", "k")
    code, _, err = run_cli(state, "key", "edit", "k", "--rpm", "1")
    assert code == 1 and "already revoked" in err
    # none clears; the key's own limits and its user's are both listed
    cli_ok(state, "key", "create", "--user", "u", "--name", "k", "--rpm", "5", "--tpm", "9")
    cli_ok(state, "key", "edit", "k", "--tpm", "none", "--description", "for the app")
    cli_ok(state, "user", "edit", "u", "--rpm", "none", "--daily-tokens", "100")
    row = json.loads(cli_ok(state, "key", "list", "--json"))[-1]
    assert (row["limits"], row["user_limits"]) == ({"rpm": 5}, {"daily_tokens": 100})
    assert row["effective_limits"] == {"rpm": 5, "daily_tokens": 100}
    assert row["description"] == "for the app"
    assert "rpm 5;" in cli_ok(state, "key", "list")  # then "user: daily 100", wrapped
    assert "daily 100" in cli_ok(state, "user", "list")
    assert before["users.toml"] != (state / "users.toml").read_bytes()
    # a hand-edited limit that is not a number is named, and nothing is rewritten
    keys = (state / "keys.toml").read_text()
    (state / "keys.toml").write_text(keys.replace("rpm = 5", 'rpm = "fast"'))
    code, _, err = run_cli(state, "key", "list")
    assert code == 1 and "rpm: expected int" in err
    (state / "keys.toml").write_text(keys.replace("rpm = 5", "rpm = 0"))
    code, _, err = run_cli(state, "key", "edit", "k", "--tpm", "3")
    assert code == 1 and "rpm: must be between 1 and 1000000" in err
    assert (state / "keys.toml").read_text() == keys.replace("rpm = 5", "rpm = 0")
