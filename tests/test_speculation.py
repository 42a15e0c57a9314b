"""Prompt-lookup speculation: the same answers as without it, in fewer decode steps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import HARBOR, NO_EOS, Server, cli_ok, free_port, run_cli

CODE = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "Rewrite the code above with type hints."
)
STORY = "Write a long story about a lighthouse keeper."


@dataclass
class Env:
    server: Server
    token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("speculation")
    state = root / "state"
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2", "--ctx", "1024",
              "--parallel", "2"]  # fmt: skip
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "on", *common)
    cli_ok(state, "assistant", "create", "off", *common, "--speculate", "off")
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Env(server, token)
    finally:
        server.stop()


def ask(env: Env, model: str, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64,
            "temperature": 0, "logit_bias": NO_EOS, **fields}  # fmt: skip
    with env.server.http(env.token) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("prompt", [CODE, STORY])
def test_greedy_answers_keep_the_models_top_token_with_drafts(env: Env, prompt: str) -> None:
    """Every kept token is the top token of the logits it was checked against.

    (The answers with and without drafts are not compared token for token: a
    draft is checked in one batch, which sums llama.cpp's products in another
    order than one token does, so where the top two are within a hair either
    may win, and how near depends on the CPU's kernels.)
    """
    on = ask(env, "on", prompt, logprobs=True, top_logprobs=2)
    off = ask(env, "off", prompt, logprobs=True, top_logprobs=2)
    assert on["timings"]["draft_n_accepted"] > 16, on["timings"]  # it did speculate
    assert "draft_n" not in off["timings"]
    for answer in (on, off):
        assert answer["usage"]["completion_tokens"] == 64
        tokens = answer["choices"][0]["logprobs"]["content"]
        assert len(tokens) == 64
        for t in tokens:
            assert t["logprob"] >= max(alt["logprob"] for alt in t["top_logprobs"]), t


def test_seeded_sampling_is_the_same_with_drafts(env: Env) -> None:
    """Every kept token was drawn by the request's own sampler, one random number each."""
    on = ask(env, "on", CODE, temperature=0.8, seed=7)
    off = ask(env, "off", CODE, temperature=0.8, seed=7)
    assert on["timings"].get("draft_n_accepted", 0) > 0
    assert on["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]


def test_drafts_stop_where_the_request_stops(env: Env) -> None:
    whole = ask(env, "on", CODE, max_tokens=48)["choices"][0]["message"]["content"]
    cut = ask(env, "on", CODE, max_tokens=7)
    assert cut["usage"]["completion_tokens"] == 7 and cut["choices"][0]["finish_reason"] == "length"
    word = "return a - b"
    assert word in whole
    stopped = ask(env, "on", CODE, max_tokens=48, stop=[word])
    assert stopped["choices"][0]["message"]["content"] == whole[: whole.index(word)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # a follow-up turn still finds its whole prefix cached: rejected draft tokens left no trace
    first = ask(env, "on", STORY, max_tokens=40)
    answer = first["choices"][0]["message"]["content"]
    follow = [{"role": "user", "content": STORY}, {"role": "assistant", "content": answer},
              {"role": "user", "content": "Shorter."}]  # fmt: skip
    with env.server.http(env.token) as http:
        second = http.post(
            "/v1/chat/completions",
            json={"model": "on", "messages": follow, "max_tokens": 2, "temperature": 0},
        ).json()
    assert second["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] + 30


def test_a_draft_that_ends_the_answer_is_counted(env: Env) -> None:
    """The answer copies the passage: after its first few tokens, drafts make the rest,
    the last one ending the answer at max_tokens (its timings were made before that
    draft was counted, so a whole draft went missing from them)."""
    answer = ask(env, "on", f"{HARBOR}\n\nRepeat the text above exactly.", max_tokens=48)
    timings = answer["timings"]
    assert answer["usage"]["completion_tokens"] == 48
    assert HARBOR[:60] in answer["choices"][0]["message"]["content"]
    assert timings["draft_n_accepted"] >= 48 - 8, timings
    assert timings["draft_n"] >= timings["draft_n_accepted"]


def test_speculation_is_an_assistant_setting(env: Env) -> None:
    code, _, err = run_cli(env.server.state_dir, "assistant", "edit", "off", "--speculate", "x")
    assert code == 2 and "ngram" in err
    shown = cli_ok(env.server.state_dir, "assistant", "show", "on", "--json")
    assert '"speculate": "ngram"' in shown
