"""POST /v1/messages and count_tokens through the official anthropic client, on the demo model.

`r1` is the demo GGUF under DeepSeek-R1's template, which opens a think
block in the prompt, so its answers start as reasoning: thinking blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from helpers import BackgroundStream, Server, cli_ok, free_port, relabel

DATA = Path(__file__).parent / "data"
GREEDY: Any = {"temperature": 0}  # the anthropic client takes no temperature any more
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@dataclass
class Env:
    server: Server
    token: str
    other_token: str

    def client(self, token: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.server.root_url, api_key=token or self.token, max_retries=0
        )

    def post(self, path: str = "/v1/messages", **body: Any) -> httpx.Response:
        payload = {"model": "gemma", "max_tokens": 8, "messages": HELLO, "temperature": 0, **body}
        with httpx.Client(base_url=self.server.root_url, timeout=60) as http:
            return http.post(path, json=payload, headers={"x-api-key": self.token})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("anthropic")
    r1 = relabel(model_path, root / "r1.gguf", DATA / "deepseek-r1.jinja")
    state = root / "state"
    common = ["--threads", "2", "--ctx", "1024", "--parallel", "2"]
    cli_ok(state, "user", "create", "u", "--force", "--assistants", "gemma,r1")
    cli_ok(state, "user", "create", "v", "--force", "--assistants", "r1")
    cli_ok(
        state,
        "assistant",
        "create",
        "gemma",
        "--model",
        model_path,
        "--chat-format",
        "gemma",
        *common,
    )
    cli_ok(state, "assistant", "create", "r1", "--model", r1, *common)
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    other = cli_ok(state, "key", "create", "--user", "v", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    try:
        yield Env(server, token, other)
    finally:
        server.stop()


def test_a_message(env: Env) -> None:
    message = env.client().messages.create(
        extra_body=GREEDY,
        model="gemma",
        max_tokens=6,
        system="Answer briefly.",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == "gemma"
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 6
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text  # type: ignore[union-attr]
    count = env.client().messages.count_tokens(
        model="gemma",
        system="Answer briefly.",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert count.input_tokens == message.usage.input_tokens


def test_stop_sequences_and_bearer_keys(env: Env) -> None:
    with httpx.Client(base_url=env.server.root_url, timeout=60) as http:
        response = http.post(
            "/v1/messages",
            headers={"authorization": f"Bearer {env.token}"},
            json={
                "model": "gemma",
                "max_tokens": 40,
                "messages": HELLO,
                "stop_sequences": [" "],
                "temperature": 0,
            },
        )
    body = response.json()
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == " "
    assert " " not in body["content"][0]["text"]


def test_the_event_stream(env: Env) -> None:
    with env.client().messages.stream(
        extra_body=GREEDY, model="gemma", max_tokens=6, messages=HELLO
    ) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    response = env.post(stream=True)
    kinds = [
        line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")
    ]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_thinking_blocks(env: Env) -> None:
    # (greedy, so that the model's first token is not a sampled "</think>")
    message = env.client().messages.create(
        model="r1",
        max_tokens=8,
        messages=HELLO,
        extra_body=GREEDY,  # type: ignore[arg-type]
    )
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking  # type: ignore[union-attr]
    off = env.client().messages.create(
        extra_body=GREEDY,
        model="r1",
        max_tokens=8,
        messages=HELLO,
        thinking={"type": "disabled"},  # type: ignore[arg-type]
    )
    assert [b.type for b in off.content] == ["text"]
    with env.client().messages.stream(
        model="r1",
        max_tokens=8,
        messages=HELLO,
        extra_body=GREEDY,  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_message()
    # (not compared with the whole answer's text: the second request is evaluated from the
    # prefix cache, and a different evaluation path may pick a different greedy token)
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking  # type: ignore[union-attr]


def test_count_tokens_counts_the_prompt_a_forced_call_gets(env: Env) -> None:
    # r1's template opens a think block, closed empty when a forced call turns thinking off
    forced: Any = {"tools": [WEATHER], "tool_choice": {"type": "any"}}
    used = env.client().messages.create(
        extra_body=GREEDY,
        model="r1",
        max_tokens=30,
        messages=HELLO,
        **forced,  # type: ignore[arg-type]
    )
    count = env.client().messages.count_tokens(model="r1", messages=HELLO, **forced)  # type: ignore[arg-type]
    assert count.input_tokens == used.usage.input_tokens


def test_tool_use_and_its_result(env: Env) -> None:
    client = env.client()
    first = client.messages.create(
        extra_body=GREEDY,
        model="gemma",
        max_tokens=60,
        messages=HELLO,
        tools=[WEATHER],  # type: ignore[list-item,arg-type]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert isinstance(use.input["city"], str)  # type: ignore[index]
    history = [
        *HELLO,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}],
        },
    ]
    second = client.messages.create(
        extra_body=GREEDY, model="gemma", max_tokens=4, messages=history, tools=[WEATHER]
    )  # type: ignore[arg-type,list-item]
    assert second.usage.input_tokens > first.usage.input_tokens
    streamed = env.post(
        max_tokens=60,
        tools=[WEATHER],
        stream=True,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    data = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")
    ]
    starts = [d["content_block"] for d in data if d["type"] == "content_block_start"]
    assert starts[0]["type"] == "tool_use" and starts[0]["name"] == "get_weather"
    partial = "".join(
        d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"
    )
    assert isinstance(json.loads(partial)["city"], str)


# every field the endpoint honours, with a value that asks for something, beside a stream
FIELDS: dict[str, Any] = {
    "system": [{"type": "text", "text": "Answer briefly."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "max_tokens": 3,
    "stop_sequences": [",", "."],
    "temperature": 0.9,
    "top_p": 0.5,
    "top_k": 3,
    "stream": True,
    "thinking": {"type": "disabled"},
    "tools": [WEATHER],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "metadata": {"user_id": "u-1"},
    "keep_alive": "20m",
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_beside_a_stream(env: Env, name: str) -> None:
    body = {name: FIELDS[name], **({"tools": [WEATHER]} if name == "tool_choice" else {})}
    with BackgroundStream(env.server.root_url, env.token, "gemma") as other:
        response = env.post(**body)
        assert response.status_code == 200, response.text
    assert other.completed(), other.events[-3:]


# wrong, missing and hostile input: Anthropic's error shape


@pytest.mark.parametrize(
    "body,words",
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "text only",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}
                ]
            },
            "cannot hold",
        ),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"thinking": {"type": "sometimes"}}, "thinking"),
        ({"tools": [WEATHER], "tool_choice": {"type": "maybe"}}, "tool_choice"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"temperature": 5}, "temperature"),
        ({"model": "nobody"}, "nobody"),
    ],
)
def test_bad_requests_get_anthropic_errors(env: Env, body: dict[str, Any], words: str) -> None:
    response = env.post(**body)
    assert response.status_code in (400, 404), response.text
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert words in error["error"]["message"]


def test_keys_and_permissions(env: Env) -> None:
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        env.client("vai-not-a-key").messages.create(
            extra_body=GREEDY, model="gemma", max_tokens=2, messages=HELLO
        )  # type: ignore[arg-type]
    assert bad_key.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as forbidden:
        env.client(env.other_token).messages.create(
            extra_body=GREEDY, model="gemma", max_tokens=2, messages=HELLO
        )  # type: ignore[arg-type]
    assert forbidden.value.status_code in (403, 404)
    assert forbidden.value.body["type"] == "error"  # type: ignore[index]


def test_an_input_schema_with_references(env: Env) -> None:
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    trip = {
        "name": "plan",
        "input_schema": {
            "type": "object",
            "$defs": {"Place": place},
            "properties": {"start": {"$ref": "#/$defs/Place"}, "end": {"$ref": "#/$defs/Place"}},
            "required": ["start", "end"],
        },
    }
    message = env.client().messages.create(
        extra_body=GREEDY,
        model="gemma",
        max_tokens=60,
        messages=[{"role": "user", "content": "A trip from Paris to Rome."}],
        tools=[trip],  # type: ignore[list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    use = message.content[-1]
    assert use.type == "tool_use" and message.stop_reason == "tool_use"
    assert isinstance(use.input["end"]["city"], str)  # type: ignore[index]


def test_a_final_assistant_message_is_continued(env: Env) -> None:
    """A prefill is the answer begun: the prompt ends with it, its turn left open."""
    client = env.client()
    ask: Any = [{"role": "user", "content": "Describe Paris as a JSON object."}]
    prefilled: Any = [*ask, {"role": "assistant", "content": "{"}]
    plain = client.messages.count_tokens(model="gemma", messages=ask).input_tokens
    begun = client.messages.count_tokens(model="gemma", messages=prefilled).input_tokens
    # the generation prompt plus the prefill's token, not a closed turn and a new one
    assert plain < begun <= plain + 2
    message = client.messages.create(
        extra_body=GREEDY, model="gemma", max_tokens=8, messages=prefilled
    )
    assert message.usage.input_tokens == begun and message.content[0].type == "text"
    with client.messages.stream(
        extra_body=GREEDY, model="gemma", max_tokens=8, messages=prefilled
    ) as stream:
        assert stream.get_final_message().usage.input_tokens == begun
    # r1's prompt opens a think block; a prefill is the answer itself, text not thinking
    thought = client.messages.create(
        extra_body=GREEDY, model="r1", max_tokens=8, messages=prefilled
    )
    assert [b.type for b in thought.content] == ["text"]
    # an empty final assistant message asks for a plain answer
    empty: Any = [*ask, {"role": "assistant", "content": ""}]
    assert client.messages.count_tokens(model="gemma", messages=empty).input_tokens == plain
    spaced: Any = [*ask, {"role": "assistant", "content": "{ "}]
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        client.messages.create(model="gemma", max_tokens=8, messages=spaced)
