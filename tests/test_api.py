"""The API end to end: `vergeai serve` on the real demo model, the real openai client."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import Deployment, cli_ok

END_OF_TURN = 106  # Gemma's <end_of_turn>
EOS = 1
NO_EOS = {str(t): -100 for t in (EOS, END_OF_TURN, 212)}  # 212 is </s>, also end-of-generation
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
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def post(d: Deployment, body: Any, token: str | None = None, **kwargs: Any) -> httpx.Response:
    with d.server.http(token if token is not None else d.admin_token) as http:
        return http.post("/v1/chat/completions", json=body, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


# models


def test_models_lists_what_the_caller_may_use(deployment: Deployment) -> None:
    admin = deployment.server.client(deployment.admin_token)
    ids = {m.id: m for m in admin.models.list()}
    assert set(ids) == {"gemma", "other"}
    gemma = ids["gemma"]
    assert gemma.object == "model" and gemma.owned_by == "vergeai"
    assert gemma.created > 0
    extra = gemma.model_extra or {}
    assert extra["status"] == "online"
    assert extra["model"] == "gemma-3-270m-q4_k_m"
    assert (ids["other"].model_extra or {})["status"] == "offline"
    user = deployment.server.client(deployment.user_token)
    assert [m.id for m in user.models.list()] == ["gemma"]


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
    assert set(timings) == TIMING_KEYS
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
    assert set(usage["timings"]) == TIMING_KEYS
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
    assert [m.id for m in client.models.list()] == ["gemma"]
    assert time.monotonic() - start < 1.0
    stream.close()


# errors


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic abc", "Bearer", "Bearer vai-unknown", "bearer x y", "x" * 5000],
)
def test_bad_credentials_are_401(deployment: Deployment, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    with httpx.Client(base_url=deployment.server.base_url, timeout=30) as http:
        for response in (
            http.get("/models", headers=headers),
            http.post("/chat/completions", headers=headers, json={"model": "gemma"}),
        ):
            assert response.status_code == 401
            err = error_of(response)
            assert err["message"] == "Login Required"
            assert err["type"] == "authentication_error"


def test_revoked_expired_and_disabled_are_401_alike(deployment: Deployment) -> None:
    state = deployment.server.state_dir
    cli_ok(state, "user", "create", "carol")
    revoked = cli_ok(state, "key", "create", "--user", "carol", "--name", "gone").strip()
    disabled_user = cli_ok(state, "user", "create", "dave")
    disabled = cli_ok(state, "key", "create", "--user", "dave", "--name", "k").strip()
    expiring = cli_ok(state, "key", "create", "--user", "carol", "--name", "soon").strip()
    assert disabled_user == ""
    # an expiry in the past cannot be made with the CLI: edit keys.toml as an admin might
    import tomllib

    import tomli_w

    keys_file = state / "keys.toml"
    data = tomllib.loads(keys_file.read_text())
    for key in data["keys"]:
        if key["name"] == "soon":
            key["expires"] = "2020-01-01T00:00:00+00:00"
    keys_file.write_text(tomli_w.dumps(data))
    cli_ok(state, "key", "revoke", "gone", "--user", "carol")
    cli_ok(state, "user", "disable", "dave")
    deadline = time.monotonic() + 5
    bodies = []
    while time.monotonic() < deadline:
        with httpx.Client(base_url=deployment.server.base_url, timeout=30) as http:
            responses = [
                http.get("/models", headers={"Authorization": f"Bearer {t}"})
                for t in (revoked, disabled, expiring)
            ]
        if all(r.status_code == 401 for r in responses):
            bodies = [r.json() for r in responses]
            break
        time.sleep(0.2)
    assert bodies and bodies[0] == bodies[1] == bodies[2]


def test_forbidden_assistant_is_403(deployment: Deployment) -> None:
    response = post(deployment, {"model": "other", "messages": HELLO}, deployment.user_token)
    assert response.status_code == 403
    assert error_of(response)["type"] == "permission_error"
    with deployment.server.http(deployment.user_token) as http:
        assert http.get("/v1/models/other").status_code == 403
        assert http.get("/v1/models/gemma").json()["id"] == "gemma"


def test_unknown_assistant_is_404_listing_allowed(deployment: Deployment) -> None:
    response = post(deployment, {"model": "Gemma", "messages": HELLO}, deployment.user_token)
    assert response.status_code == 404
    err = error_of(response)
    assert "Model Not Found" in err["message"] and "'Gemma'" in err["message"]
    assert "gemma" in err["message"] and "other" not in err["message"]
    with pytest.raises(openai.NotFoundError):
        deployment.server.client(deployment.user_token).chat.completions.create(
            model="nope", messages=HELLO
        )


def test_offline_assistant_is_503(deployment: Deployment) -> None:
    response = post(deployment, {"model": "other", "messages": HELLO})
    assert response.status_code == 503
    assert "offline" in error_of(response)["message"]


def test_prompt_longer_than_context_is_400(deployment: Deployment) -> None:
    long = [{"role": "user", "content": "hello " * 3000}]
    response = post(deployment, {"model": "gemma", "messages": long})
    assert response.status_code == 400
    err = error_of(response)
    assert err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 1024 and err["n_prompt_tokens"] > 1024
    stream = post(deployment, {"model": "gemma", "messages": long, "stream": True})
    assert stream.status_code == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": 5, "messages": HELLO}, "model"),
        ({"model": "gemma"}, "messages"),
        ({"model": "gemma", "messages": []}, "messages"),
        ({"model": "gemma", "messages": "hi"}, "messages"),
        ({"model": "gemma", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "gemma", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "gemma", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"model": "gemma", "messages": [3]}, "messages[0]"),
        ({"model": "gemma", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "gemma", "messages": HELLO, "temperature": 9}, "temperature"),
        ({"model": "gemma", "messages": HELLO, "top_p": -1}, "top_p"),
        ({"model": "gemma", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "gemma", "messages": HELLO, "max_tokens": 1.5}, "max_tokens"),
        (
            {"model": "gemma", "messages": HELLO, "max_completion_tokens": -3},
            "max_completion_tokens",
        ),
        ({"model": "gemma", "messages": HELLO, "stop": 5}, "stop"),
        ({"model": "gemma", "messages": HELLO, "stop": ["a"] * 50}, "stop"),
        ({"model": "gemma", "messages": HELLO, "seed": "x"}, "seed"),
        ({"model": "gemma", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "gemma", "messages": HELLO, "presence_penalty": 5}, "presence_penalty"),
        ({"model": "gemma", "messages": HELLO, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": "gemma", "messages": HELLO, "logit_bias": {"1": 500}}, "logit_bias"),
        ({"model": "gemma", "messages": HELLO, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"model": "gemma", "messages": HELLO, "stream_options": 1}, "stream_options"),
        ({"model": "gemma", "messages": HELLO, "n": 2}, "n"),
        ({"model": "gemma", "messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
        (
            {"model": "gemma", "messages": HELLO, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"model": "gemma", "messages": HELLO, "logprobs": True}, "logprobs"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    deployment: Deployment, body: dict[str, Any], param: str
) -> None:
    response = post(deployment, body)
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_unknown_fields_are_ignored(deployment: Deployment) -> None:
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 2, "user": "x", "whatever": [1]}
    assert post(deployment, body).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[1, 2]", b"null", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000],
)
def test_malformed_bodies_are_400(deployment: Deployment, raw: bytes) -> None:
    response = post(deployment, None, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_huge_body_is_413(deployment: Deployment) -> None:
    big = {"model": "gemma", "messages": [{"role": "user", "content": "a" * (2 * 1024 * 1024)}]}
    response = post(deployment, big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"


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


def test_unknown_route_is_json_404(deployment: Deployment) -> None:
    with deployment.server.http(deployment.admin_token) as http:
        response = http.get("/v1/nothing")
    assert response.status_code == 404
    assert error_of(response)


def test_tokens_never_reach_the_log(deployment: Deployment) -> None:
    log = deployment.server.log()
    assert "POST /v1/chat/completions" in log
    assert deployment.admin_token not in log
    assert deployment.user_token not in log
    assert "Traceback" not in log
