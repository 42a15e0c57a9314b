"""The API end to end: `vergeai serve` on the real demo model, the real openai client.

What is decided before a request reaches the model (auth, routing, request
validation, error shapes) is tested in-process in test_api_fast.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
from helpers import END_OF_TURN, HELLO, NO_EOS, Deployment, error_of, sse_events

TIMING_KEYS = {
    "cache_n",
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
}
DRAFT_KEYS = {"draft_n", "draft_n_accepted"}  # there when speculation drafted


def timing_keys(timings: dict[str, Any]) -> set[str]:
    """The keys besides the draft pair, which comes whole or not at all."""
    keys = set(timings)
    assert keys >= DRAFT_KEYS or not keys & DRAFT_KEYS, keys
    return keys - DRAFT_KEYS


def post(d: Deployment, body: Any, token: str | None = None, **kwargs: Any) -> httpx.Response:
    with d.server.http(token if token is not None else d.admin_token) as http:
        return http.post("/v1/chat/completions", json=body, **kwargs)


# completions


def test_chat_completion_shape(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    reply = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=8, temperature=0, logit_bias=NO_EOS
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "gemma" and reply.system_fingerprint == "gemma"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    timings = (reply.model_extra or {})["timings"]
    assert timing_keys(timings) == TIMING_KEYS
    assert timings["predicted_n"] == 8
    assert timings["prompt_n"] + timings["cache_n"] == reply.usage.prompt_tokens


def test_stream_invariants(deployment: Deployment) -> None:
    body = {
        "model": "gemma",
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        deployment.server.http(deployment.user_token) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gemma" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    content = chunks[1:-2]
    assert content and all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    final = chunks[-2]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 6
    assert timing_keys(usage["timings"]) == TIMING_KEYS
    assert "usage" not in final


def test_stream_matches_non_stream_under_greedy(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    args: dict[str, Any] = dict(
        model="gemma", messages=HELLO, max_tokens=12, temperature=0, logit_bias=NO_EOS
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    parts = []
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(parts) == whole
    assert finish == "length"


def test_stop_string_ends_the_answer_before_it(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    args: dict[str, Any] = dict(model="gemma", messages=HELLO, temperature=0, logit_bias=NO_EOS)
    text = client.chat.completions.create(**args, max_tokens=16).choices[0].message.content
    assert text and len(text) > 12
    stop = text[6:10]
    reply = client.chat.completions.create(**args, max_tokens=16, stop=[stop, "never-seen"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[: text.index(stop)]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, max_tokens=16, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == text[: text.index(stop)]


def test_end_of_turn_finishes_with_stop(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    reply = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=16, logit_bias={str(END_OF_TURN): 100}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == ""
    assert reply.usage is not None and reply.usage.completion_tokens == 1


def test_follow_up_turn_reuses_the_kv_cache(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    first = [{"role": "user", "content": "Tell me a fact about whales, in detail please."}]
    one = client.chat.completions.create(
        model="gemma", messages=first, max_tokens=16, temperature=0, logit_bias=NO_EOS
    )
    answer = one.choices[0].message.content or ""
    follow = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And one about dolphins?"},
    ]
    two = client.chat.completions.create(
        model="gemma", messages=follow, max_tokens=4, temperature=0, logit_bias=NO_EOS
    )
    timings = (two.model_extra or {})["timings"]
    assert two.usage is not None
    assert timings["cache_n"] > 0
    assert timings["prompt_n"] < two.usage.prompt_tokens
    assert timings["cache_n"] + timings["prompt_n"] == two.usage.prompt_tokens
    # everything of turn one's prompt was reused
    assert one.usage is not None and timings["cache_n"] >= one.usage.prompt_tokens - 1


def test_seed_makes_sampling_repeatable(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    args: dict[str, Any] = dict(
        model="gemma", messages=HELLO, max_tokens=10, temperature=1.0, seed=1234, logit_bias=NO_EOS
    )
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b


def test_text_part_content_and_multi_turn_roles(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    reply = client.chat.completions.create(
        model="gemma",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        max_tokens=4,
        logit_bias=NO_EOS,
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4


# concurrency and disconnects


def test_concurrent_requests_both_complete_in_full(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        text = []
        for chunk in client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": f"Count to {i + 5}."}],
            max_tokens=32,
            temperature=0,
            logit_bias=NO_EOS,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                results[i] = chunk.usage.completion_tokens
            elif chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {0: 32, 1: 32, 2: 32}


def test_disconnect_mid_stream_frees_the_slots(deployment: Deployment) -> None:
    body = {
        "model": "gemma",
        "messages": HELLO,
        "max_tokens": 3000,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    # both slots busy with streams that would run for ~40 s, then dropped
    for _ in range(2):
        with (
            deployment.server.http(deployment.user_token) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
    start = time.monotonic()
    client = deployment.server.client(deployment.user_token)
    for _ in range(2):
        reply = client.chat.completions.create(
            model="gemma", messages=HELLO, max_tokens=4, logit_bias=NO_EOS
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert time.monotonic() - start < 10


def test_models_answers_while_generating(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    stream = client.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=64, logit_bias=NO_EOS, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    start = time.monotonic()
    models = client.models.list().data
    assert time.monotonic() - start < 1.0
    assert [m.id for m in models] == ["gemma"]
    assert (models[0].model_extra or {})["status"] == "online"
    stream.close()


# errors that need the model: its context size, its vocabulary, its tokenizer


def test_prompt_longer_than_context_is_400(deployment: Deployment) -> None:
    long = [{"role": "user", "content": "hello " * 3000}]
    response = post(deployment, {"model": "gemma", "messages": long})
    assert response.status_code == 400
    err = error_of(response)
    assert err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 1024 and err["n_prompt_tokens"] > 1024
    stream = post(deployment, {"model": "gemma", "messages": long, "stream": True})
    assert stream.status_code == 400


def test_logit_bias_beyond_the_vocabulary_is_400(deployment: Deployment) -> None:
    body = {"model": "gemma", "messages": HELLO, "logit_bias": {"99999999": 1}}
    response = post(deployment, body)
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "logit_bias" and "logit_bias" in err["message"]


def test_unknown_fields_are_ignored(deployment: Deployment) -> None:
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 2, "user": "x", "whatever": [1]}
    assert post(deployment, body).status_code == 200


def test_hostile_content_is_answered_not_crashed(deployment: Deployment) -> None:
    for content in (
        "\x00\x01",
        "<start_of_turn>model\n",
        "🦀" * 50,
        "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    ):
        body = {"model": "gemma", "messages": [{"role": "user", "content": content}],
                "max_tokens": 2}  # fmt: skip
        assert post(deployment, body).status_code == 200


def test_tokens_never_reach_the_log(deployment: Deployment) -> None:
    """Each token in a request that succeeds, one that fails, and a malformed header."""
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 2, "logit_bias": NO_EOS}
    marks = []
    with httpx.Client(base_url=deployment.server.root_url, timeout=60) as http:
        for token in (deployment.admin_token, deployment.user_token):
            for auth, status in ((f"Bearer {token}", 200), (f"Bearer {token[:-1]}x", 401),
                                 (f"Basic {token}", 401)):  # fmt: skip
                marks.append(f"tokens-{uuid.uuid4().hex[:12]}")
                headers = {"Authorization": auth, "X-Request-ID": marks[-1]}
                response = http.post("/v1/chat/completions", json=body, headers=headers)
                assert response.status_code == status, response.text
    for mark in marks:  # the access lines are written after the answers were sent
        log = deployment.server.wait_logged(f"request_id={mark}")
    assert "POST /v1/chat/completions 200" in log
    assert "POST /v1/chat/completions 401" in log
    for token in (deployment.admin_token, deployment.user_token):
        assert token not in log and token[:-1] not in log
    assert "Traceback" not in log
