"""POST /v1/completions on the real demo model, through the openai client and raw HTTP.

`fim` is the demo GGUF with three unused tokens named as its fill-in-the-middle
tokens (the model was not trained for FIM, but the request path runs for real).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from helpers import (
    NO_EOS,
    BackgroundStream,
    Server,
    cli_ok,
    error_of,
    free_port,
    readme_fields,
    relabel,
    sse_events,
)

from vergeai.api.completions import COMPLETION_FIELDS

PROMPT = "The capital of France is"


@dataclass
class Env:
    server: Server
    token: str

    def client(self) -> openai.OpenAI:
        return self.server.client(self.token)

    def post(self, **body: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post("/v1/completions", json={"model": "gemma", **body})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("completions")
    # Gemma's <unused0..2> (ids 6, 7, 8) as the FIM tokens
    fim_ids = {"tokenizer.ggml.fim_pre_token_id": 6, "tokenizer.ggml.fim_suf_token_id": 7,
               "tokenizer.ggml.fim_mid_token_id": 8}  # fmt: skip
    fim = relabel(model_path, root / "fim.gguf", uint32s=fim_ids)
    state = root / "state"
    common = ["--threads", "2", "--ctx", "512", "--parallel", "2", "--chat-format", "gemma"]
    cli_ok(state, "user", "create", "u", "--force", "--assistants", "gemma,fim")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, *common,
           "--system-prompt", "You are a pirate.")  # fmt: skip
    cli_ok(state, "assistant", "create", "fim", "--model", str(fim), *common)
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    try:
        yield Env(server, token)
    finally:
        server.stop()


def test_the_prompt_is_the_prompt(env: Env) -> None:
    reply = env.client().completions.create(
        model="gemma",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logit_bias=NO_EOS,  # type: ignore[arg-type]
    )
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.text
    # no chat template and no system prompt: BOS and the prompt's own 5 tokens
    assert reply.usage is not None and reply.usage.prompt_tokens == 6
    assert reply.usage.completion_tokens == 6
    assert reply.model_extra and reply.model_extra["timings"]["predicted_n"] == 6


def test_a_token_prompt_is_the_same_prompt(env: Env) -> None:
    text = env.post(prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0).json()
    tokens = [2, 818, 5279, 529, 7001, 563]  # BOS and PROMPT, as the demo model tokenizes it
    same = env.post(prompt=tokens, max_tokens=1, temperature=0, logprobs=0).json()
    assert same["usage"]["prompt_tokens"] == 6
    assert same["choices"][0]["text"] == text["choices"][0]["text"]


def test_several_prompts_and_choices_with_echo_and_logprobs(env: Env) -> None:
    reply = env.client().completions.create(
        model="gemma", prompt=["One, two,", "A, B,"], n=2, max_tokens=5, temperature=0,
        logprobs=3, echo=True, logit_bias=NO_EOS,  # type: ignore[arg-type]
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        prompt = "One, two," if choice.index < 2 else "A, B,"
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert len(lp.tokens) == 5 and "".join(lp.tokens) == choice.text[len(prompt) :]
        assert lp.text_offset is not None and lp.text_offset[0] == len(prompt)
        assert all(len(top) <= 3 for top in lp.top_logprobs)
        # greedy: the chosen token is the most likely one
        assert all(max(top.values()) >= lp_ - 1e-6 for top, lp_ in
                   zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # fmt: skip
    assert reply.usage is not None and reply.usage.completion_tokens == 20


def test_streamed_with_usage(env: Env) -> None:
    stream = env.client().completions.create(
        model="gemma", prompt=["One, two,", "A, B,"], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, logit_bias=NO_EOS,  # type: ignore[arg-type]
    )  # fmt: skip
    texts = {0: "", 1: ""}
    finished = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert finished == {0: "length", 1: "length"} and all(texts.values())
    assert usage is not None and usage.completion_tokens == 8


def test_streamed_echo_comes_first(env: Env) -> None:
    response = env.post(prompt="One, two,", max_tokens=3, stream=True, echo=True)
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["text"] == "One, two,"


def test_fill_in_the_middle(env: Env) -> None:
    reply = env.post(model="fim", prompt="def add(a, b):\n", suffix="\n    return c\n",
                     max_tokens=4, temperature=0).json()  # fmt: skip
    prefix = env.post(model="fim", prompt="def add(a, b):\n", max_tokens=1).json()
    suffix = env.post(model="fim", prompt="\n    return c\n", max_tokens=1).json()
    # BOS, FIM prefix, the prefix, FIM suffix, the suffix, FIM middle
    expected = 1 + 1 + (prefix["usage"]["prompt_tokens"] - 1) + 1
    expected += (suffix["usage"]["prompt_tokens"] - 1) + 1
    assert reply["usage"]["prompt_tokens"] == expected
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    response = env.post(prompt="def add(a, b):\n", suffix="    return c\n")
    assert response.status_code == 400
    err = error_of(response)
    assert err["param"] == "suffix" and "fill-in-the-middle" in err["message"]


# every accepted field, through the model

CASES: dict[str, Any] = {
    "model": "gemma",
    "prompt": ["One", [2, 818]],
    "suffix": "",
    "echo": True,
    "logprobs": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 3,
    "n_predict": 2,
    "temperature": 1.5,
    "top_p": 0.5,
    "top_k": 3,
    "min_p": 0.2,
    "stop": [","],
    "seed": 7,
    "presence_penalty": 1.0,
    "frequency_penalty": -1.0,
    "repeat_penalty": 1.3,
    "repeat_last_n": 16,
    "logit_bias": {"1": -100},
    "grammar": 'root ::= " yes" | " no"',
    "n": 2,
    "response_format": {"type": "json_object"},
    "json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
    "cache_salt": "tenant-7",
    "keep_alive": "20m",
    # ignored
    "user": "alice",
    "cache_prompt": False,
    "n_keep": 4,
    "id_slot": 0,
    "samplers": ["top_k"],
    "mirostat_tau": 4.0,
    "mirostat_eta": 0.2,
    "dynatemp_exponent": 1.5,
    "xtc_threshold": 0.2,
    "dry_base": 1.5,
    "dry_allowed_length": 3,
    "dry_penalty_last_n": -1,
    "dry_sequence_breakers": ["\n"],
}


def test_every_field_has_a_case() -> None:
    assert set(CASES) == {f.name for f in COMPLETION_FIELDS if f.kind != "refused"}


def test_readme_lists_every_field_where_it_belongs() -> None:
    for kind, named in readme_fields("Completions").items():
        assert named == {f.name for f in COMPLETION_FIELDS if f.kind == kind}, kind


@pytest.mark.parametrize("name", sorted(CASES))
def test_accepted_field_through_the_model(env: Env, name: str) -> None:
    # (beside another stream only once: the worker is chat's, whose matrix runs every field so)
    body = {"prompt": PROMPT, "max_tokens": 4, name: CASES[name]}
    response = env.post(**body)
    assert response.status_code == 200, response.text
    if body.get("stream"):
        assert sse_events(response)[-1] == "[DONE]"


def test_a_completion_beside_a_chat_stream(env: Env) -> None:
    with BackgroundStream(env.server.root_url, env.token, "gemma") as other:
        body = {**CASES, "prompt": PROMPT, "max_tokens": 4, "stream": False}
        del body["json_schema"], body["response_format"]  # (the grammar is given)
        response = env.post(**body)
        assert response.status_code == 200, response.text
    assert other.completed(), other.events[-3:]


# wrong, missing, huge and hostile input


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": {}}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": ["a", 7]}, "prompt[1]"),
        ({"prompt": [1.5]}, "prompt[0]"),
        ({"prompt": [True]}, "prompt[0]"),
        ({"prompt": ["x"] * 65}, "prompt"),
        ({"prompt": [2, 10**9]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": ["a", [3, 10**6]]}, "prompt[1]"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "suffix": 5}, "suffix"),
        ({"prompt": "x", "n": 9}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "mirostat": 2}, "mirostat"),
        ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
        ({"prompt": "x " * 2000}, "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(env: Env, body: dict[str, Any], param: str) -> None:
    response = env.post(**body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_other_users_and_assistants(env: Env) -> None:
    with env.server.http("vai-nope") as http:
        assert (
            http.post("/v1/completions", json={"model": "gemma", "prompt": "x"}).status_code == 401
        )
    with env.server.http(env.token) as http:
        missing = http.post("/v1/completions", json={"model": "nobody", "prompt": "x"})
    assert missing.status_code == 404
    assert env.post(prompt="x", max_tokens=1).status_code == 200
