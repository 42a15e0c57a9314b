"""Structured output on the real demo model: response_format and json_schema, and images refused."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import pytest
from helpers import HELLO, Deployment, error_of, sse_events
from pydantic import BaseModel

CITY = {
    "type": "object",
    "properties": {
        "capital": {"enum": ["Paris", "Rome", "Berlin"]},
        "population_millions": {"type": "integer"},
        "coastal": {"type": "boolean"},
    },
    "required": ["capital", "population_millions", "coastal"],
}


class City(BaseModel):
    capital: Literal["Paris", "Rome", "Berlin"]
    coastal: bool


def post(d: Deployment, body: dict[str, Any]) -> httpx.Response:
    with d.server.http(d.admin_token) as http:
        return http.post("/v1/chat/completions", json=body)


def ask(d: Deployment, **fields: Any) -> dict[str, Any]:
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 120, "temperature": 0, **fields}
    response = post(d, body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_json_schema_output_matches_the_schema(deployment: Deployment) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    reply = ask(deployment, response_format=fmt)
    assert reply["choices"][0]["finish_reason"] == "stop"
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert set(value) == {"capital", "population_millions", "coastal"}
    assert value["capital"] in ("Paris", "Rome", "Berlin")
    assert isinstance(value["population_millions"], int) and isinstance(value["coastal"], bool)


def test_llama_server_json_schema_field(deployment: Deployment) -> None:
    reply = ask(deployment, json_schema={"type": "array", "items": {"type": "boolean"},
                                         "minItems": 2, "maxItems": 2})  # fmt: skip
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert isinstance(value, list) and len(value) == 2 and all(isinstance(v, bool) for v in value)


def test_json_object_output_is_an_object(deployment: Deployment) -> None:
    reply = ask(deployment, response_format={"type": "json_object"}, max_tokens=40)
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith("{")
    if reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


def test_streamed_structured_output(deployment: Deployment) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 120, "temperature": 0,
            "response_format": fmt, "stream": True}  # fmt: skip
    with deployment.server.http(deployment.admin_token) as http:
        response = http.post("/v1/chat/completions", json=body)
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    text = "".join(
        c["delta"].get("content") or "" for e in events[:-1] for c in e.get("choices", [])
    )
    assert json.loads(text)["capital"] in ("Paris", "Rome", "Berlin")


def test_openai_parse_with_a_pydantic_model(deployment: Deployment) -> None:
    client = deployment.server.client(deployment.user_token)
    completion = client.chat.completions.parse(
        model="gemma", messages=HELLO, response_format=City, max_tokens=120, temperature=0
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.capital in ("Paris", "Rome", "Berlin")


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"not": {"type": "string"}}, '["not"]'),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, '["uniqueItems"]'),
        ({"type": "object", "properties": {"a": {"type": "wizard"}}}, "wizard"),
        ({"type": "string", "format": "wizard"}, "Unknown format: wizard"),
        ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
    ],
)  # fmt: skip
def test_a_schema_that_cannot_be_enforced_is_400_naming_it(
    deployment: Deployment, schema: dict[str, Any], named: str
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    response = post(deployment, {"model": "gemma", "messages": HELLO, "response_format": fmt})
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["param"] == "response_format" and "cannot be enforced" in err["message"]
    assert named in err["message"]


def test_number_ranges_and_multiples_are_honoured(deployment: Deployment) -> None:
    numbers = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "integer", "minimum": 10, "exclusiveMaximum": 30, "multipleOf": 5}}  # fmt: skip
    for seed in range(3):
        reply = ask(deployment, json_schema=numbers, temperature=1.0, seed=seed, max_tokens=40)
        values = json.loads(reply["choices"][0]["message"]["content"])
        assert len(values) == 4 and all(v in (10, 15, 20, 25) for v in values), values


def test_defs_and_refs_are_followed(deployment: Deployment) -> None:
    schema = {"$defs": {"flag": {"type": "boolean"}}, "type": "object",
              "properties": {"a": {"$ref": "#/$defs/flag"}}, "required": ["a"]}  # fmt: skip
    reply = ask(deployment, json_schema=schema, max_tokens=20)
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"])["a"], bool)


def test_a_property_named_like_a_keyword_is_fine(deployment: Deployment) -> None:
    schema = {"type": "object", "properties": {"not": {"type": "boolean"}}, "required": ["not"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    reply = ask(deployment, response_format=fmt, max_tokens=20)
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"])["not"], bool)


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file"])
def test_media_content_parts_are_a_clear_400(deployment: Deployment, kind: str) -> None:
    part = {"type": kind, kind: {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    response = post(deployment, {"model": "gemma", "messages": messages})
    assert response.status_code == 400
    err = error_of(response)
    assert err["param"] == "messages[0].content" and "text only" in err["message"]
    assert kind in err["message"]


def test_langchain_with_structured_output(deployment: Deployment) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="gemma", base_url=deployment.server.base_url, api_key=deployment.user_token,
        temperature=0, max_tokens=60, max_retries=0,
    )  # fmt: skip
    structured = llm.with_structured_output(City, method="json_schema")
    result = structured.invoke(HELLO[0]["content"])
    assert isinstance(result, City) and result.capital in ("Paris", "Rome", "Berlin")

    # json_mode: a JSON object, parsed by LangChain; the prompt has to name the keys
    class Place(BaseModel):
        name: str
        country: str

    mode = llm.with_structured_output(Place, method="json_mode", include_raw=True)
    out = mode.invoke("Give the capital of France as JSON with keys name and country.")
    assert out["parsing_error"] is None, out["raw"]
    assert isinstance(out["parsed"], Place)
