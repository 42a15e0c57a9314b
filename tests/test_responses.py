"""The Responses API through the official openai client, on the demo model.

`r1` is the demo GGUF under DeepSeek-R1's template (its prompt opens a think
block), for reasoning items.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import BackgroundStream, Server, cli_ok, error_of, free_port, relabel
from pydantic import BaseModel, Field

from vergeai.api.app import create_app
from vergeai.service import Service
from vergeai.state.config import load_config
from vergeai.state.responses import MAX_STORED, Responses
from vergeai.state.store import Store

DATA = Path(__file__).parent / "data"
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@dataclass
class Env:
    server: Server
    token: str
    other: str
    narrow: str  # user u's key narrowed to r1

    def client(self, token: str | None = None) -> openai.OpenAI:
        return self.server.client(token or self.token)

    def post(self, **body: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post("/v1/responses", json={"model": "gemma", "temperature": 0, **body})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("responses")
    r1 = relabel(model_path, root / "r1.gguf", DATA / "deepseek-r1.jinja")
    state = root / "state"
    common = ["--threads", "2", "--ctx", "1024", "--parallel", "2"]
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "user", "create", "v")
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
    narrow = cli_ok(state, "key", "create", "--user", "u", "--name", "r1-only",
                    "--assistants", "r1").strip()  # fmt: skip
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    try:
        yield Env(server, token, other, narrow)
    finally:
        server.stop()


def test_a_response_and_its_follow_up(env: Env) -> None:
    client = env.client()
    first = client.responses.create(
        temperature=0, model="gemma", input=QUESTION, max_output_tokens=6
    )
    assert first.object == "response" and first.id.startswith("resp_")
    assert first.status == "incomplete" and first.incomplete_details is not None
    assert first.incomplete_details.reason == "max_output_tokens"
    assert first.output_text and first.usage is not None and first.usage.output_tokens == 6
    follow = client.responses.create(
        temperature=0,
        model="gemma",
        input="And of Italy?",
        previous_response_id=first.id,
        max_output_tokens=4,
    )
    assert follow.previous_response_id == first.id and follow.usage is not None
    # the follow-up's prompt starts with the first conversation: its tokens are cached
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_instructions_are_not_carried_over(env: Env) -> None:
    client = env.client()
    plain = client.responses.create(
        temperature=0, model="gemma", input=QUESTION, max_output_tokens=1
    )
    told = client.responses.create(
        temperature=0,
        model="gemma",
        input=QUESTION,
        max_output_tokens=1,
        instructions="Answer in one word, always.",
    )
    assert plain.usage and told.usage and told.usage.input_tokens > plain.usage.input_tokens
    after = client.responses.create(
        temperature=0,
        model="gemma",
        input="Again.",
        previous_response_id=told.id,
        max_output_tokens=1,
    )
    again = client.responses.create(
        temperature=0,
        model="gemma",
        input="Again.",
        previous_response_id=plain.id,
        max_output_tokens=1,
    )
    assert after.usage and again.usage
    # the same conversation after either: the instructions were not carried over
    assert abs(after.usage.input_tokens - again.usage.input_tokens) <= 2


def test_store_false_and_other_users(env: Env) -> None:
    client = env.client()
    kept = client.responses.create(
        temperature=0, model="gemma", input=QUESTION, max_output_tokens=1
    )
    unkept = client.responses.create(
        temperature=0, model="gemma", input=QUESTION, max_output_tokens=1, store=False
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError):
        env.client(env.other).responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        env.client(env.other).responses.delete(kept.id)
    response = env.post(input="x", previous_response_id=kept.id, max_output_tokens=1)
    assert response.status_code == 200  # its owner may continue it
    with env.server.http(env.other) as http:
        theirs = http.post(
            "/v1/responses", json={"model": "gemma", "input": "x", "previous_response_id": kept.id}
        )
    assert theirs.status_code == 404 and error_of(theirs)["param"] == "previous_response_id"
    # the same user's key narrowed to another assistant sees none of it either
    narrow = env.client(env.narrow)
    with pytest.raises(openai.NotFoundError):
        narrow.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        narrow.responses.delete(kept.id)
    with env.server.http(env.narrow) as http:
        body = {"model": "r1", "input": "x", "previous_response_id": kept.id}
        assert http.post("/v1/responses", json=body).status_code == 404
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)


def test_the_event_stream(env: Env) -> None:
    response = env.post(input=QUESTION, max_output_tokens=5, stream=True)
    lines = response.text.splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == deltas
    assert final["usage"]["output_tokens"] == 5


def test_events_and_responses_hold_to_the_sdks_strict_types(env: Env) -> None:
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for cut in (3, 60):
        streamed = env.post(input="Say hi.", max_output_tokens=cut, stream=True)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ")]  # fmt: skip
        for event in events:
            adapter.validate_python(event, strict=True)
        final = events[-1]["response"]
        Response.model_validate(final, strict=True)
        message = final["output"][-1]
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"][-1]
        # an answer cut by max_output_tokens leaves its message incomplete, as OpenAI does
        status = "incomplete" if final["status"] == "incomplete" else "completed"
        assert message["status"] == done["status"] == status
        details = final["usage"]["input_tokens_details"]
        assert (
            details["cached_tokens"] + details["cache_write_tokens"]
            == final["usage"]["input_tokens"]
        )
    assert events is not None
    whole = env.post(input="Say hi.", max_output_tokens=3).json()
    Response.model_validate(whole, strict=True)
    assert whole["status"] == whole["output"][-1]["status"] == "incomplete"


def test_input_items_are_listed_and_paged(env: Env) -> None:
    client = env.client()
    items: Any = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        {"type": "message", "role": "assistant", "content": "It is sunny.", "id": "msg_mine"},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip
    made = client.responses.create(
        temperature=0, model="gemma", input=items, tools=[WEATHER], max_output_tokens=1
    )  # type: ignore[list-item]
    listed = list(client.responses.input_items.list(made.id, limit=2, order="asc"))
    assert [i.type for i in listed] == ["message", "message", "function_call",
                                        "function_call_output", "message", "message"]  # fmt: skip
    assert len({i.id for i in listed}) == 6 and listed[4].id == "msg_mine"
    assert listed[0].role == "developer" and listed[0].content[0].text == "Be brief."  # type: ignore[union-attr]
    assert listed[3].output == "Sunny"  # type: ignore[union-attr]
    newest = client.responses.input_items.list(made.id)
    assert [i.id for i in newest.data] == [i.id for i in reversed(listed)]
    assert newest.has_more is False
    page = client.responses.input_items.list(made.id, limit=3, after=listed[1].id, order="asc")
    assert [i.id for i in page.data] == [i.id for i in listed[2:5]] and page.has_more
    one = client.responses.create(temperature=0, model="gemma", input="Hi", max_output_tokens=1)
    (only,) = client.responses.input_items.list(one.id).data
    assert only.type == "message" and only.role == "user"  # type: ignore[union-attr]
    # none of it for another user or a key narrowed to another assistant
    for token in (env.other, env.narrow):
        with pytest.raises(openai.NotFoundError):
            env.client(token).responses.input_items.list(made.id)
    with env.server.http(env.token) as http:
        for query, param in (({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
                             ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                             ({"after": "nope"}, "after")):  # fmt: skip
            bad = http.get(f"/v1/responses/{made.id}/input_items", params=query)
            assert bad.status_code == 400 and error_of(bad)["param"] == param
        assert http.get("/v1/responses/resp_nope/input_items").status_code == 404


def test_a_function_whose_parameters_have_references(env: Env) -> None:
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    parameters = {
        "type": "object",
        "definitions": {"Place": place},  # draft-07's spelling
        "properties": {"start": {"$ref": "#/definitions/Place"}},
        "required": ["start"],
    }
    tools: Any = [{"type": "function", "name": "plan", "parameters": parameters}]
    reply = env.client().responses.create(
        temperature=0, model="gemma", input="A trip from Paris.", tools=tools,
        tool_choice="required", parallel_tool_calls=False, max_output_tokens=40,
    )  # fmt: skip
    call = reply.output[-1]
    assert call.type == "function_call" and call.name == "plan"
    assert isinstance(json.loads(call.arguments)["start"]["city"], str)


def test_function_calls_whole_streamed_and_answered(env: Env) -> None:
    client = env.client()
    tools: Any = [WEATHER]
    first = client.responses.create(
        temperature=0,
        model="gemma",
        input="Weather in Paris?",
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
    )
    assert first.status == "completed"
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}]
    after = client.responses.create(
        temperature=0,
        model="gemma",
        input=result,
        previous_response_id=first.id,  # type: ignore[arg-type]
        tools=tools,
        max_output_tokens=3,
    )
    assert after.usage and first.usage and after.usage.input_tokens > first.usage.input_tokens
    named: Any = {"type": "function", "name": "get_weather"}
    with client.responses.stream(
        temperature=0,
        model="gemma",
        input="Weather in Paris?",
        tools=tools,
        tool_choice=named,
        parallel_tool_calls=False,
        max_output_tokens=60,
    ) as stream:
        final = stream.get_final_response()
    assert final.output[-1].type == "function_call"
    # a whole conversation given as items works the same
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
    ]
    assert env.post(input=items, tools=tools, max_output_tokens=2).status_code == 200


def test_structured_output_with_parse(env: Env) -> None:
    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)

    parsed = env.client().responses.parse(
        temperature=0, model="gemma", input="Paris as JSON", text_format=City, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, City)


def test_reasoning_items(env: Env) -> None:
    reply = env.client().responses.create(
        temperature=0, model="r1", input=QUESTION, max_output_tokens=8
    )
    assert reply.output[0].type == "reasoning"
    assert reply.output[0].content and reply.output[0].content[0].text  # type: ignore[union-attr]
    off = env.client().responses.create(
        temperature=0, model="r1", input=QUESTION, max_output_tokens=8, reasoning={"effort": "none"}
    )
    assert [o.type for o in off.output] == ["message"]


def test_sampling_fields_reach_the_model(env: Env) -> None:
    body = {
        "input": QUESTION,
        "max_output_tokens": 8,
        "temperature": 0,
        "top_p": 0.5,
        "extra": "ignored",
        "metadata": {"a": "b"},
    }
    one = env.post(**body).json()
    two = env.post(**body).json()
    assert one["output"][0]["content"] == two["output"][0]["content"]
    assert one["metadata"] == {"a": "b"} and one["temperature"] == 0
    # top_k 1 is greedy whatever the temperature: it reached the sampler
    greedy = env.post(input=QUESTION, max_output_tokens=8, temperature=1.9, top_k=1, seed=5)
    assert greedy.json()["output"][0]["content"] == one["output"][0]["content"]


# every field the endpoint honours, with a value that asks for something, beside a stream
FIELDS: dict[str, Any] = {
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
    "instructions": "Answer briefly.",
    "max_output_tokens": 3,
    "temperature": 1.5,
    "top_p": 0.5,
    "top_k": 3,
    "min_p": 0.2,
    "seed": 9,
    "stream": True,
    "store": False,
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "parallel_tool_calls": False,
    "text": {
        "format": {
            "type": "json_schema",
            "name": "a",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        }
    },
    "reasoning": {"effort": "none"},
    "metadata": {"team": "search"},
    "keep_alive": "20m",
}
COMPANIONS: dict[str, dict[str, Any]] = {
    "tool_choice": {"tools": [WEATHER]},
    "parallel_tool_calls": {"tools": [WEATHER]},
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_beside_a_stream(env: Env, name: str) -> None:
    body = {
        "input": QUESTION,
        "max_output_tokens": 8,
        **COMPANIONS.get(name, {}),
        name: FIELDS[name],
    }
    with BackgroundStream(env.server.root_url, env.token, "gemma") as other:
        response = env.post(**body)
        assert response.status_code == 200, response.text
    assert other.completed(), other.events[-3:]


def test_previous_response_id_beside_a_stream(env: Env) -> None:
    previous = env.post(input=QUESTION, max_output_tokens=2).json()["id"]
    with BackgroundStream(env.server.root_url, env.token, "gemma") as other:
        response = env.post(input="More.", previous_response_id=previous, max_output_tokens=2)
        assert response.status_code == 200, response.text
    assert other.completed(), other.events[-3:]


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "message", "role": "bot", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": "x", "store": "yes"}, "store"),
        ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
        ({"input": "x", "instructions": 5}, "instructions"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "x", "text": "json"}, "text"),
        ({"input": "x", "max_output_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(env: Env, body: dict[str, Any], param: str) -> None:
    response = env.post(**body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


@pytest.mark.parametrize("name", ["background", "conversation", "prompt"])
def test_what_is_not_here_is_refused(env: Env, name: str) -> None:
    response = env.post(input="x", **{name: True if name == "background" else {"id": "x"}})
    assert response.status_code == 400
    assert error_of(response)["code"] == "unsupported_parameter"


def test_unknown_previous_response_is_404(env: Env) -> None:
    response = env.post(input="x", previous_response_id="resp_nope")
    assert response.status_code == 404
    assert error_of(response)["param"] == "previous_response_id"


def test_responses_expire_with_their_assistants_history(tmp_path: Path) -> None:
    store = Responses(tmp_path)
    store.put("u", "a", {"id": "resp_1"}, [{"role": "user", "content": "hi"}])
    assert store.get("u", "resp_1", {"a": 30}) is not None
    assert store.get("v", "resp_1", {"a": 30}) is None
    old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
    with sqlite3.connect(tmp_path / "responses.db") as db:
        db.execute("UPDATE responses SET created=?", (old,))
    assert store.get("u", "resp_1", {"a": 30}) is None  # and it is deleted
    store.put("u", "gone", {"id": "resp_2"}, [])
    assert store.get("u", "resp_2", {"a": 30}) is None  # its assistant is gone


def test_stored_responses_are_capped_and_pruned(tmp_path: Path) -> None:
    """Rows expired only when read, and rows of deleted users and assistants stayed."""
    store = Responses(tmp_path)
    assert store.put("u", "gemma", {"id": "r1"}, [])
    assert not store.put("u", "gemma", {"id": "big", "tools": ["x" * MAX_STORED]}, [])
    store.put("gone", "gemma", {"id": "r2"}, [])  # a user deleted since
    store.put("u", "retired", {"id": "r3"}, [])  # an assistant deleted since
    assert store.prune({"gemma": 30}, {"u"}) == 2
    assert store.get("u", "r1", {"gemma": 30}) is not None
    with sqlite3.connect(tmp_path / "responses.db") as db:  # r1 is 31 days old
        old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
        db.execute("UPDATE responses SET created=? WHERE id='r1'", (old,))
    assert store.prune({"gemma": 30}, {"u"}) == 1
    assert store.prune({"gemma": 30}, {"u"}) == 0


def test_one_users_stored_responses_are_held_to_their_share(tmp_path: Path) -> None:
    store = Responses(tmp_path, per_user=5000)
    for i in range(6):
        assert store.put("u", "gemma", {"id": f"r{i}", "text": "x" * 1000}, [])
    store.put("v", "gemma", {"id": "v0", "text": "x" * 1000}, [])
    kept = [f"r{i}" for i in range(6) if store.get("u", f"r{i}", {"gemma": 30})]
    assert kept == ["r2", "r3", "r4", "r5"]  # the oldest went first
    assert store.get("v", "v0", {"gemma": 30}) is not None
    assert not store.put("u", "gemma", {"id": "huge", "text": "x" * 6000}, [])
    assert store.get("u", "r5", {"gemma": 30}) is not None  # nothing went for what was refused


def test_the_share_is_set_in_config_toml(tmp_path: Path) -> None:
    app = create_app(Service(Store(tmp_path)), store_mb_per_user=3)
    assert app.state.responses.per_user == app.state.sessions.history.per_user == 3 * 1024**2
    config = tmp_path / "config.toml"
    config.write_text("store_mb_per_user = 3\n")
    assert load_config(tmp_path, {}).store_mb_per_user == 3


def test_a_responses_db_from_before_input_items_is_upgraded(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "responses.db") as db:
        db.execute(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, user TEXT NOT NULL, assistant TEXT "
            "NOT NULL, created TEXT NOT NULL, response TEXT NOT NULL, conversation TEXT NOT NULL)"
        )
        now = datetime.now(UTC).isoformat()
        db.execute("INSERT INTO responses VALUES ('old', 'u', 'a', ?, '{}', '[]')", (now,))
    store = Responses(tmp_path)
    found = store.get("u", "old", {"a": 30})
    assert found is not None and found.input == [] and found.response == {}
    assert store.put("u", "a", {"id": "new"}, [], [{"type": "message", "id": "m"}])
    found = store.get("u", "new", {"a": 30})
    assert found is not None and found.input == [{"type": "message", "id": "m"}]
