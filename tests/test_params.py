"""Every request field the schema accepts, sent through the real model.

The cases are checked against the schema's own field table: a field added to
``CHAT_FIELDS`` without a case here fails ``test_every_field_has_a_case``.
Each accepted field is sent with a non-default value alone and while another
stream runs on the same assistant; the answer is 200, the other stream ends
with [DONE], and the assistant stays online. Refused fields' neutral values
are accepted; that the others are a 400 naming the field, like bad values
of the accepted ones, is tested in test_api_fast.py.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from helpers import (
    HELLO,
    NO_EOS,
    REFUSED,
    BackgroundStream,
    Deployment,
    readme_fields,
    sse_events,
)

from vergeai.api.defaults import sampling_for
from vergeai.api.schemas import CHAT_FIELDS, parse_chat_request
from vergeai.state.assistants import Assistant

PARTS = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
    },
}
CALL: Any = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
BASE: dict[str, Any] = {"model": "gemma", "messages": HELLO, "max_tokens": 4}

# field -> a non-default value (sent on top of BASE)
CASES: dict[str, Any] = {
    "model": "gemma",
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": PARTS},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "41"},
        {"role": "assistant", "content": None, "function_call": CALL["function"]},
        {"role": "function", "name": "f", "content": "42"},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 3,
    "max_completion_tokens": 2,
    "n_predict": 2,
    "temperature": 1.7,
    "top_p": 0.3,
    "top_k": 3,
    "min_p": 0.3,
    "stop": ["\n", "."],
    "seed": 12345,
    "presence_penalty": 1.5,
    "frequency_penalty": -1.5,
    "repeat_penalty": 1.4,
    "repeat_last_n": -1,
    "logit_bias": {"563": 5, "1": -100},
    "chat_template_kwargs": {"enable_thinking": False},
    "reasoning_format": "none",
    "session_id": "matrix-session",
    "grammar": 'root ::= "yes" | "no"',
    "cache_salt": "tenant-7",
    "keep_alive": "20m",
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "a",
            "schema": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
            },
        },
    },
    "json_schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
    "logprobs": True,
    "top_logprobs": 5,  # with logprobs: true (COMPANIONS)
    "n": 2,
    "tools": [TOOL],
    "tool_choice": "required",  # with tools (COMPANIONS)
    "parallel_tool_calls": False,  # with tools, required
    "functions": [TOOL["function"]],
    "function_call": {"name": "f"},  # with functions
    # accepted and ignored
    "user": "alice@example.com",
    "store": True,
    "metadata": {"team": "search"},
    "service_tier": "auto",
    "prompt_cache_key": "k1",
    "safety_identifier": "u-1",
    "reasoning_effort": "low",
    "verbosity": "low",
    "cache_prompt": False,
    "n_keep": 10,
    "id_slot": 1,
    "samplers": ["top_k", "temperature"],
    "mirostat_tau": 4.0,
    "mirostat_eta": 0.2,
    "dynatemp_exponent": 1.5,
    "xtc_threshold": 0.2,
    "dry_base": 1.5,
    "dry_allowed_length": 3,
    "dry_penalty_last_n": -1,
    "dry_sequence_breakers": ["\n"],
}

# what a field needs beside it to mean anything
COMPANIONS: dict[str, dict[str, Any]] = {
    "top_logprobs": {"logprobs": True},
    "tool_choice": {"tools": [TOOL]},
    "parallel_tool_calls": {"tools": [TOOL], "tool_choice": "required"},
    "function_call": {"functions": [TOOL["function"]]},
}


def post(d: Deployment, body: dict[str, Any]) -> httpx.Response:
    with d.server.http(d.admin_token) as http:
        return http.post("/v1/chat/completions", json=body)


def check_answer(response: httpx.Response, body: dict[str, Any]) -> dict[str, Any]:
    """200 and a whole answer (streamed or not); returns the last chunk or the body."""
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        return dict(response.json())
    events = sse_events(response)
    assert events[-1] == "[DONE]", events
    assert not any("error" in e for e in events if isinstance(e, dict)), events
    return dict(events[-2])


def assistant_online(d: Deployment) -> bool:
    health = httpx.get(f"{d.server.root_url}/health").json()
    return bool(health["status"] == "ok" and health["assistants"]["gemma"] == "online")


def test_every_field_has_a_case() -> None:
    accepted = {f.name for f in CHAT_FIELDS if f.kind != "refused"}
    refused = {f.name for f in CHAT_FIELDS if f.kind == "refused"}
    assert set(CASES) == accepted, "fields without a case, or cases for no field"
    assert set(REFUSED) == refused


@pytest.mark.parametrize("name", sorted(CASES))
def test_accepted_field_alone_and_beside_a_stream(deployment: Deployment, name: str) -> None:
    body = {**BASE, **COMPANIONS.get(name, {}), name: CASES[name]}
    check_answer(post(deployment, body), body)
    with BackgroundStream(deployment.server.root_url, deployment.admin_token, "gemma") as other:
        check_answer(post(deployment, body), body)
    assert other.completed(), other.events[-3:]
    assert assistant_online(deployment)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_field_with_its_neutral_value_is_accepted(
    deployment: Deployment, name: str
) -> None:
    spec = next(f for f in CHAT_FIELDS if f.name == name)
    for neutral in spec.neutral:
        body = {**BASE, "max_tokens": 1, name: neutral}
        assert post(deployment, body).status_code == 200, (name, neutral)


# the fields' effects, where one answer can show them


def greedy(d: Deployment, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    body = {"model": "gemma", "messages": HELLO, "temperature": 0, "max_tokens": max_tokens,
            "logit_bias": NO_EOS, **extra}  # fmt: skip
    response = post(d, body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def content(reply: dict[str, Any]) -> str:
    return str(reply["choices"][0]["message"]["content"])


def test_length_fields_bound_the_answer(deployment: Deployment) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        reply = greedy(deployment, **{"max_tokens": None, name: 3})
        assert reply["usage"]["completion_tokens"] == 3, name
        assert reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"repeat_penalty": 2.0},
        {"repeat_penalty": 2.0, "repeat_last_n": -1},
    ],
)
def test_penalties_change_a_repetitive_greedy_answer(
    deployment: Deployment, penalty: dict[str, Any]
) -> None:
    plain = content(greedy(deployment, 48))
    assert content(greedy(deployment, 48, **penalty)) != plain


def test_repeat_last_n_zero_turns_the_repeat_penalty_off(deployment: Deployment) -> None:
    plain = content(greedy(deployment, 48))
    assert content(greedy(deployment, 48, repeat_penalty=2.0, repeat_last_n=0)) == plain


def test_top_k_one_is_greedy(deployment: Deployment) -> None:
    plain = content(greedy(deployment, 16))
    sampled = greedy(deployment, 16, temperature=1.5, top_k=1, seed=7)
    assert content(sampled) == plain


def test_min_p_one_is_greedy(deployment: Deployment) -> None:
    plain = content(greedy(deployment, 16))
    assert content(greedy(deployment, 16, temperature=1.5, min_p=1.0, seed=7)) == plain


def test_grammar_constrains_the_answer(deployment: Deployment) -> None:
    reply = greedy(deployment, 8, grammar='root ::= "yes" | "no"', logit_bias=None)
    assert content(reply) in ("yes", "no")


def test_readme_lists_every_field_where_it_belongs() -> None:
    for kind, named in readme_fields("Request fields").items():
        expected = {f.name for f in CHAT_FIELDS if f.kind == kind}
        assert expected <= named, (kind, expected - named)
        others = {f.name for f in CHAT_FIELDS if f.kind != kind}
        # a refused field's neutral value may be quoted in its bullet, nothing else
        assert not (named & others), (kind, named & others)


def test_the_openai_client_sends_them_all(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    extra = {"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2, "repeat_last_n": 32}
    raw = client.chat.completions.with_raw_response.create(
        model="gemma", messages=HELLO, max_tokens=6, presence_penalty=0.5,
        frequency_penalty=0.5, temperature=0.7, top_p=0.9, seed=3, stop=["\n\n"],
        user="alice", metadata={"a": "b"}, store=False, extra_body=extra,
    )  # fmt: skip
    assert raw.headers["x-request-id"]
    assert raw.parse().choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=6, presence_penalty=0.5, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma", messages=HELLO, modalities=["audio"])
    assert info.value.code == "unsupported_parameter"
    assert info.value.body["param"] == "modalities"  # type: ignore[index]


def test_logprobs_come_from_the_model_distribution(deployment: Deployment) -> None:
    body = {"model": "gemma", "messages": HELLO, "temperature": 0, "max_tokens": 8,
            "logprobs": True, "top_logprobs": 5}  # fmt: skip
    reply = post(deployment, body).json()
    entries = reply["choices"][0]["logprobs"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"] - (
        reply["choices"][0]["finish_reason"] == "stop"  # the end-of-turn token has none
    )
    assert "".join(e["token"] for e in entries) == reply["choices"][0]["message"]["content"]
    for e in entries:
        top = e["top_logprobs"]
        assert len(top) == 5 and e["logprob"] <= 0
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one
        assert top[0]["token"] == e["token"] and top[0]["logprob"] == e["logprob"]
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
    plain = post(deployment, {**body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == reply["choices"][0]["message"]["content"]


def test_streamed_logprobs_with_the_openai_client(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    stream = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=6, temperature=0, logit_bias=NO_EOS,
        logprobs=True, top_logprobs=2, stream=True,
    )  # fmt: skip
    entries = []
    text = ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                entries.extend(choice.logprobs.content)
    assert len(entries) == 6 and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == text
    whole = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=6, temperature=0, logit_bias=NO_EOS,
        logprobs=True,
    )  # fmt: skip
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [e.token for e in content] == [e.token for e in entries]
    assert all(e.top_logprobs == [] for e in content)


def test_n_choices_share_one_prompt_evaluation(deployment: Deployment) -> None:
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 12, "temperature": 1.0,
            "seed": 5, "logit_bias": NO_EOS, "n": 2}  # fmt: skip
    reply = post(deployment, body).json()
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in choices)
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 24
    # the prompt was evaluated once: the n=2 answer counts it once
    alone = post(deployment, {**body, "n": 1}).json()
    assert reply["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]


def test_choice_i_samples_with_seed_plus_i() -> None:
    # (compared here, not by sampling: a prompt evaluated in one batch and one re-evaluated
    # from the cache give logits apart by up to ~0.9 on the demo model, enough to flip a
    # token drawn at temperature 1)
    req = parse_chat_request({"model": "gemma", "messages": HELLO, "seed": 2**32 - 1, "n": 3})
    assistant = Assistant(name="gemma", model="m.gguf")
    assert [sampling_for(req, assistant, i).seed for i in range(3)] == [2**32 - 1, 0, 1]


def test_n_choices_stream_with_their_index(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    stream = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=5, logit_bias=NO_EOS, n=2, stream=True,
        stream_options={"include_usage": True}, logprobs=True,
    )  # fmt: skip
    texts = {0: "", 1: ""}
    finished = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert finished == {0: "length", 1: "length"}
    assert all(texts.values())
    assert usage is not None and usage.completion_tokens == 10


def test_a_choice_that_ends_first_says_so_first(deployment: Deployment) -> None:
    # a grammar where a choice is one token or many; seeds until the two choices differ
    body = {"model": "gemma", "messages": HELLO, "n": 2, "stream": True, "temperature": 2.0,
            "grammar": 'root ::= "x" | "y" [a-z]{20,30}', "max_tokens": 40}  # fmt: skip
    for seed in range(12):
        events = sse_events(post(deployment, {**body, "seed": seed}))
        chunks = [e["choices"][0] for e in events if isinstance(e, dict) and e["choices"]]
        texts = {i: "".join(c["delta"].get("content") or "" for c in chunks if c["index"] == i)
                 for i in (0, 1)}  # fmt: skip
        if sorted(texts.values())[0] == "x" and texts[0] != texts[1]:
            break  # one choice is the single token "x", the other 20 letters or more
    else:
        pytest.fail("no seed gave one short and one long choice")
    short = 0 if texts[0] == "x" else 1
    ends = [n for n, c in enumerate(chunks) if c["finish_reason"] is not None]
    assert [chunks[n]["index"] for n in ends] == [short, 1 - short]
    last_long = max(n for n, c in enumerate(chunks) if c["index"] != short and c["delta"])
    assert ends[0] < last_long, "the short choice's end is sent as it happens"


def test_choices_beyond_a_requests_share_of_slots_run_in_turns(deployment: Deployment) -> None:
    """3 slots: one request holds 2 at most (5 choices run 2, 2, then 1), so another
    caller's stream, sent after it, starts while it is still answering."""
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 24, "logit_bias": NO_EOS,
            "n": 5, "temperature": 1.0, "seed": 3}  # fmt: skip
    replies: list[httpx.Response] = []
    many = threading.Thread(target=lambda: replies.append(post(deployment, body)))
    many.start()
    time.sleep(0.3)
    with BackgroundStream(deployment.server.root_url, deployment.user_token, "gemma", 4) as other:
        assert many.is_alive(), "the other stream waited for every choice"
    many.join()
    assert other.completed()
    reply = replies[0].json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3, 4]
    assert reply["usage"]["completion_tokens"] == 5 * 24
    alone = post(deployment, {**body, "n": 1}).json()
    assert reply["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
