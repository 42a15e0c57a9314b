"""The HTTP layer alone: `create_app` in-process, a real state dir, no model loaded.

Everything here is decided before a request reaches a model worker: keys,
users and permissions, routing, request validation, body limits, error
shapes, request ids, /health and /metrics. Every assistant is offline, so
a request that passes validation ends in a 503; what needs a model to
answer is tested on `vergeai serve` in the other modules.
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import tomli_w
from helpers import HELLO, REFUSED, AppClient, FastDeployment, cli_ok, error_of

CHAT = "/v1/chat/completions"
HEX_ID = re.compile(r"[0-9a-f]{32}")


FN: Any = {"type": "function", "function": {"name": "f"}}


def hello(**fields: Any) -> dict[str, Any]:
    """A chat request for `gemma` with HELLO, and these fields."""
    return {"model": "gemma", "messages": HELLO, **fields}


def raw_post(fast: FastDeployment, raw: bytes) -> httpx.Response:
    return fast.app.post(
        CHAT, fast.admin_token, content=raw, headers={"Content-Type": "application/json"}
    )


# models, health, metrics


def test_models_lists_what_the_caller_may_use(fast: FastDeployment) -> None:
    admin = fast.app.openai(fast.admin_token)
    ids = {m.id: m for m in fast.app.run(admin.models.list()).data}
    assert set(ids) == {"gemma", "other"}
    for model in ids.values():
        assert model.object == "model" and model.owned_by == "vergeai"
        assert model.created > 0
        extra = model.model_extra or {}
        assert extra["model"] == "gemma-3-270m-q4_k_m"
        assert extra["status"] == "offline"  # an online one is seen in test_api
    user = fast.app.openai(fast.user_token)
    assert [m.id for m in fast.app.run(user.models.list()).data] == ["gemma"]
    assert fast.app.run(user.models.retrieve("gemma")).id == "gemma"


def test_health_needs_no_key_and_names_every_assistant(fast: FastDeployment) -> None:
    response = fast.app.get("/health")
    # no assistant is meant to be online: none is failing, but none can serve either
    assert response.status_code == 503 and response.headers["retry-after"]
    assistants = {"gemma": "offline", "other": "offline"}
    assert response.json() == {"status": "offline", "assistants": assistants}


def test_metrics_need_an_admin_key(fast: FastDeployment) -> None:
    response = fast.app.get("/metrics", fast.admin_token)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "vergeai:requests_total" in response.text
    forbidden = fast.app.get("/metrics", fast.user_token)
    assert forbidden.status_code == 403
    assert error_of(forbidden)["type"] == "permission_error"
    for token in (None, "vai-unknown"):
        refused = fast.app.get("/metrics", token)
        assert refused.status_code == 401
        assert error_of(refused)["type"] == "authentication_error"


def test_public_metrics_need_no_key(fast: FastDeployment) -> None:
    with AppClient(fast.state_dir, metrics_public=True) as public:
        response = public.get("/metrics")
    assert response.status_code == 200
    assert "vergeai:requests_total" in response.text


# keys and users


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic abc", "Bearer", "Bearer vai-unknown", "bearer x y", "x" * 5000],
)
def test_bad_credentials_are_401(fast: FastDeployment, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for response in (
        fast.app.get("/v1/models", headers=headers),
        fast.app.get("/v1/models/gemma", headers=headers),
        fast.app.post(CHAT, headers=headers, json={"model": "gemma"}),
        fast.app.get("/metrics", headers=headers),
    ):
        assert response.status_code == 401
        err = error_of(response)
        assert err["message"] == "Login Required"
        assert err["type"] == "authentication_error"


def test_revoked_expired_and_disabled_are_401_alike(
    fast: FastDeployment, caplog: pytest.LogCaptureFixture
) -> None:
    state = fast.state_dir
    cli_ok(state, "user", "create", "carol")
    revoked = cli_ok(state, "key", "create", "--user", "carol", "--name", "gone").strip()
    expiring = cli_ok(state, "key", "create", "--user", "carol", "--name", "soon").strip()
    assert cli_ok(state, "user", "create", "dave") == ""
    disabled = cli_ok(state, "key", "create", "--user", "dave", "--name", "k").strip()
    fast.app.refresh()
    tokens = (revoked, expiring, disabled)
    assert [fast.app.get("/v1/models", t).status_code for t in tokens] == [200, 200, 200]
    cli_ok(state, "key", "revoke", "gone", "--user", "carol")
    cli_ok(state, "user", "disable", "dave")
    # an expiry in the past cannot be made with the CLI: edit keys.toml as an admin might
    keys_file = state / "keys.toml"
    data = tomllib.loads(keys_file.read_text())
    for key in data["keys"]:
        if key["name"] == "soon":
            key["expires"] = "2020-01-01T00:00:00+00:00"
    keys_file.write_text(tomli_w.dumps(data))
    fast.app.refresh()
    with caplog.at_level(logging.INFO, logger="vergeai.access"):
        responses = [fast.app.get("/v1/models", t) for t in (*tokens, "vai-never-issued")]
        responses.append(fast.app.get("/v1/models", headers={"Authorization": "Basic x"}))
    assert [r.status_code for r in responses] == [401] * 5
    # nothing tells a revoked, expired or disabled key from one that never existed
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies)
    # but the operator's log says why, and whose key it was; never the token
    logged = [r.getMessage() for r in caplog.records if r.name == "vergeai.access"]
    assert len(logged) == 5
    for line, who, why in zip(logged, ["carol/gone", "carol/soon", "dave/k", "-", "-"],
                              ["revoked", "expired", "user-disabled", "unknown", "not-bearer"],
                              strict=True):  # fmt: skip
        assert f"key={who} " in line and line.endswith(f" refused={why}"), line
    assert not any(t in "".join(logged) for t in tokens)


def test_a_key_is_accepted_the_moment_it_is_created(fast: FastDeployment) -> None:
    # no refresh in between: the server looks at the state dir for a key it does not know
    cli_ok(fast.state_dir, "user", "create", "erin")
    for round in range(5):
        token = cli_ok(fast.state_dir, "key", "create", "--user", "erin", "--name", f"k{round}")
        assert fast.app.get("/v1/models", token.strip()).status_code == 200


# routing by assistant


def test_forbidden_assistant_is_403(fast: FastDeployment) -> None:
    response = fast.app.post(CHAT, fast.user_token, json={"model": "other", "messages": HELLO})
    assert response.status_code == 403
    assert error_of(response)["type"] == "permission_error"
    assert fast.app.get("/v1/models/other", fast.user_token).status_code == 403
    assert fast.app.get("/v1/models/gemma", fast.user_token).json()["id"] == "gemma"


def test_unknown_assistant_is_404_listing_allowed(fast: FastDeployment) -> None:
    response = fast.app.post(CHAT, fast.user_token, json={"model": "Gemma", "messages": HELLO})
    assert response.status_code == 404
    err = error_of(response)
    assert "Model Not Found" in err["message"] and "'Gemma'" in err["message"]
    assert "gemma" in err["message"] and "other" not in err["message"]
    client = fast.app.openai(fast.user_token)
    with pytest.raises(openai.NotFoundError):
        fast.app.run(client.chat.completions.create(model="nope", messages=HELLO))  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["other", "gemma"])
def test_offline_assistant_is_503_with_retry_after(fast: FastDeployment, model: str) -> None:
    for stream in (False, True):
        body = {"model": model, "messages": HELLO, "stream": stream}
        response = fast.app.post(CHAT, fast.admin_token, json=body)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        err = error_of(response)
        assert err["type"] == "unavailable_error" and err["code"] == "model_unavailable"
        assert "offline" in err["message"] and f"vergeai assistant online {model}" in err["message"]


def test_unknown_route_is_json_404(fast: FastDeployment) -> None:
    for path in ("/v1/nothing", "/", "/v1/chat/completions/x"):
        response = fast.app.get(path, fast.admin_token)
        assert response.status_code == 404
        assert error_of(response)["type"] == "invalid_request_error"


# request validation


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
        (hello(temperature="hot"), "temperature"),
        (hello(temperature=9), "temperature"),
        (hello(top_p=-1), "top_p"),
        (hello(max_tokens=0), "max_tokens"),
        (hello(max_tokens=1.5), "max_tokens"),
        (hello(max_completion_tokens=-3), "max_completion_tokens"),
        (hello(n_predict="all"), "n_predict"),
        (hello(stop=5), "stop"),
        (hello(stop=["a"] * 50), "stop"),
        (hello(seed="x"), "seed"),
        (hello(seed=10**30), "seed"),
        (hello(seed=-(10**30)), "seed"),
        (hello(stream="yes"), "stream"),
        (hello(presence_penalty=5), "presence_penalty"),
        (hello(presence_penalty=10**400), "presence_penalty"),
        (hello(top_k=-1), "top_k"),
        (hello(top_k=1.5), "top_k"),
        (hello(min_p=2), "min_p"),
        (hello(repeat_penalty=0), "repeat_penalty"),
        (hello(repeat_penalty="x"), "repeat_penalty"),
        (hello(repeat_last_n=-2), "repeat_last_n"),
        (hello(logit_bias={"x": 1}), "logit_bias"),
        (hello(logit_bias={"1": 500}), "logit_bias"),
        (hello(stream_options=1), "stream_options"),
        (
            hello(chat_template_kwargs={"enable_thinking": "no"}),
            "chat_template_kwargs.enable_thinking",
        ),
        (hello(chat_template_kwargs="x"), "chat_template_kwargs"),
        (hello(reasoning_format="sideways"), "reasoning_format"),
        (hello(grammar=7), "grammar"),
        (hello(n=0), "n"),
        (hello(n=9), "n"),
        (hello(n=1.5), "n"),
        (hello(n=True), "n"),  # true is not 1
        (hello(tools=[{"type": "function"}]), "tools[0].function"),
        (hello(tools="f"), "tools"),
        (hello(tools=[FN] * 129), "tools"),
        (
            hello(tools=[{"type": "function", "function": {"name": "a b"}}]),
            "tools[0].function.name",
        ),
        (hello(tools=[FN, FN]), "tools[1]"),
        (
            hello(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
            "tools[0].function.parameters",
        ),
        (hello(tools=[FN], tool_choice="sometimes"), "tool_choice"),
        (
            hello(tools=[FN], tool_choice={"type": "function", "function": {"name": "g"}}),
            "tool_choice",
        ),
        (hello(tools=[FN], tool_choice={"name": "f"}), "tool_choice"),
        (hello(tool_choice="required"), "tool_choice"),
        (hello(tools=[FN], parallel_tool_calls="yes"), "parallel_tool_calls"),
        (hello(tools=[FN], functions=[FN["function"]]), "functions"),
        (hello(functions={"name": "f"}), "functions"),
        (hello(functions=[FN["function"]], function_call={"name": "g"}), "function_call"),
        (hello(functions=[FN["function"]], function_call="required"), "function_call"),
        (hello(tools=[FN], grammar='root ::= "x"'), "tools"),
        (
            hello(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]),
            "messages[1].tool_call_id",
        ),
        (
            hello(messages=[{"role": "assistant", "content": None, "tool_calls": {"id": "1"}}]),
            "messages[0].tool_calls",
        ),
        (
            hello(messages=[{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]),
            "messages[0].tool_calls[0].function.name",
        ),
        (
            hello(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "function": {"name": "f", "arguments": {"x": 1}}}
                        ],
                    }
                ]
            ),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            hello(messages=[{"role": "assistant", "function_call": {"name": 7}}]),
            "messages[0].function_call.name",
        ),
        (hello(response_format={"type": "xml"}), "response_format"),
        (hello(response_format="json"), "response_format"),
        (hello(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (
            hello(response_format={"type": "json_schema", "json_schema": {"schema": []}}),
            "response_format.json_schema.schema",
        ),
        (hello(response_format={"type": "json_object"}, grammar='root ::= "x"'), "response_format"),
        (hello(json_schema={"enum": ["x" * 1000] * 300}), "json_schema"),
        (
            hello(json_schema={"type": "object"}, response_format={"type": "json_object"}),
            "json_schema",
        ),
        (hello(json_schema=[1]), "json_schema"),
        (hello(logprobs="yes"), "logprobs"),
        (hello(top_logprobs=3), "top_logprobs"),
        (hello(logprobs=False, top_logprobs=3), "top_logprobs"),
        (hello(logprobs=True, top_logprobs=21), "top_logprobs"),
        (hello(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    fast: FastDeployment, body: dict[str, Any], param: str
) -> None:
    # the body is sent as the bytes json.dumps makes: 10**400 stays an integer literal
    response = raw_post(fast, json.dumps(body).encode())
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split("[")[0].split(".")[0] in err["message"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_field_is_400_naming_it(fast: FastDeployment, name: str) -> None:
    body = hello(max_tokens=4, **{name: REFUSED[name]})
    response = fast.app.post(CHAT, fast.admin_token, json=body)
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["param"] == name and name in err["message"]
    assert err["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1, 2]",
        b"null",
        b"\xff\xfe\x00",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "gemma", "messages": ' + b"[" * 500 + b"]" * 500 + b"}",
        b'{"model": "gemma", "messages": [], "temperature": NaN}',
        b'{"model": "gemma", "messages": [], "frequency_penalty": Infinity}',
        b'{"model": "gemma", "model": "other", "messages": []}',
    ],
)
def test_malformed_bodies_are_400(fast: FastDeployment, raw: bytes) -> None:
    response = raw_post(fast, raw)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


def test_lone_surrogates_are_400_and_metrics_stay_up(fast: FastDeployment) -> None:
    bodies = [
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "gemma", "messages": [], "grammar": "\\ud800"}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
    ]
    for raw in bodies:
        response = raw_post(fast, raw)
        assert response.status_code == 400, response.text
        assert "surrogate" in error_of(response)["message"]
    assert fast.app.get("/metrics", fast.admin_token).status_code == 200


def test_huge_integers_are_400_not_500(fast: FastDeployment) -> None:
    for field in ("max_tokens", "seed", "temperature", "top_k"):
        raw = b'{"model": "gemma", "messages": [], "%s": 1%s}' % (field.encode(), b"0" * 4400)
        response = raw_post(fast, raw)
        assert response.status_code == 400, response.text
        assert error_of(response)["type"] == "invalid_request_error"


def test_huge_body_is_413(fast: FastDeployment) -> None:
    big = {"model": "gemma", "messages": [{"role": "user", "content": "a" * (2 * 1024 * 1024)}]}
    response = fast.app.post(CHAT, fast.admin_token, json=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts bytes
        for _ in range(40):
            yield b"a" * 65536

    chunked = fast.app.post(CHAT, fast.admin_token, content=chunks())
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert error_of(chunked)["code"] == "request_too_large"


def test_unknown_model_names_share_one_metrics_label(fast: FastDeployment) -> None:
    first = fast.app.post(CHAT, fast.admin_token, json={"model": "nope", "messages": HELLO})
    assert first.status_code == 404
    before = fast.app.get("/metrics", fast.admin_token).text
    for i in range(20):
        body = {"model": f"nope-{i}", "messages": HELLO}
        assert fast.app.post(CHAT, fast.admin_token, json=body).status_code == 404
    after = fast.app.get("/metrics", fast.admin_token).text
    assert "nope-" not in after
    labels = set(re.findall(r'assistant="([^"]*)"', after))
    assert labels <= {"-", "gemma", "other"}
    assert len(after.splitlines()) == len(before.splitlines())


# request ids


def test_every_response_has_a_request_id(
    fast: FastDeployment, caplog: pytest.LogCaptureFixture
) -> None:
    token = fast.admin_token
    responses = [
        fast.app.get("/v1/models", token),
        fast.app.get("/health"),
        fast.app.get("/v1/nothing", token),
        fast.app.get("/v1/models"),
        fast.app.post(CHAT, token, json={"model": "gemma", "messages": HELLO}),
        fast.app.post(CHAT, token, json={"model": "gemma"}),
        fast.app.post(CHAT, token, json={"model": "nope", "messages": HELLO}),
    ]
    assert [r.status_code for r in responses] == [200, 503, 404, 401, 503, 400, 404]
    with caplog.at_level(logging.INFO, logger="vergeai.access"):
        mine = fast.app.get("/v1/models", token, headers={"X-Request-ID": "trace-42.a"})
        bad = fast.app.get("/v1/models", token, headers={"X-Request-ID": "bad id\twith\x7f"})
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(HEX_ID.fullmatch(i) for i in ids)
    assert mine.headers["x-request-id"] == "trace-42.a"
    assert HEX_ID.fullmatch(bad.headers["x-request-id"])
    logged = [r.getMessage() for r in caplog.records if r.name == "vergeai.access"]
    assert any("request_id=trace-42.a" in line for line in logged), logged
    assert not any("bad id" in line for line in logged), logged
