"""Tool calling for real: the demo model under four chat templates, through real clients.

`gemma` has no tool format (the tools are described in its system message);
`qwen`, `llama` and `mistral` are the demo GGUF re-labelled with Qwen3's,
Llama 3.2's and Mistral Nemo's templates, as the thinking tests do. A forced
``tool_choice`` makes even this tiny model call well-formed tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import Server, cli_ok, error_of, free_port, relabel, sse_events
from pydantic import BaseModel

DATA = Path(__file__).parent / "data"
FAMILIES = ("gemma", "qwen", "llama", "mistral")
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["tz"],
        },
    },
}
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", '"name":')


@dataclass
class Tools:
    server: Server
    token: str

    def client(self) -> openai.OpenAI:
        return self.server.client(self.token)

    def post(self, **body: Any) -> httpx.Response:
        payload = {"messages": QUESTION, "temperature": 0, "max_tokens": 60, **body}
        with self.server.http(self.token) as http:
            return http.post("/v1/chat/completions", json=payload)


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Tools]:
    root = tmp_path_factory.mktemp("tools")
    templates = {"qwen": "qwen3-tools.jinja", "llama": "llama-3.2.jinja",
                 "mistral": "mistral-nemo.jinja"}  # fmt: skip
    models = {
        name: relabel(model_path, root / f"{name}.gguf", DATA / t) for name, t in templates.items()
    }
    state = root / "state"
    common = ["--threads", "2", "--ctx", "1024", "--parallel", "2"]
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format",
           "gemma", *common)  # fmt: skip
    for name, path in models.items():
        cli_ok(state, "assistant", "create", name, "--model", path, *common)
    cli_ok(state, "assistant", "create", "memo", "--model", models["qwen"], *common,
           "--chat-history")  # fmt: skip
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    try:
        yield Tools(server, token)
    finally:
        server.stop()


def check_weather_arguments(arguments: str) -> dict[str, Any]:
    """The arguments are JSON holding the schema's required properties with their types."""
    args = json.loads(arguments)
    assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")
    assert set(args) <= {"city", "unit", "days"}
    assert isinstance(args.get("days", 1), int)
    return dict(args)


@pytest.mark.parametrize("model", FAMILIES)
def test_required_call_whole(tools: Tools, model: str) -> None:
    reply = tools.client().chat.completions.create(
        model=model, messages=QUESTION, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:
        assert json.loads(call.function.arguments)["tz"] in ("UTC", "CET")
    if model == "mistral":
        assert len(call.id) == 9 and call.id.isalnum()  # what its template insists on
    else:
        assert call.id.startswith("call_")


@pytest.mark.parametrize("model", FAMILIES)
def test_named_call_streamed_as_openai_streams_it(tools: Tools, model: str) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": model, "tools": [TIME, WEATHER], "tool_choice": choice, "stream": True,
            "parallel_tool_calls": False}  # fmt: skip
    response = tools.post(**body)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    first = calls[0][0]
    assert first["index"] == 0 and first["type"] == "function"
    assert first["id"] and first["function"]["name"] == "get_weather"
    rest = [c[0] for c in calls[1:]]
    assert len(rest) > 2, "the arguments come in pieces"
    assert all(set(r) == {"index", "function"} and set(r["function"]) == {"arguments"}
               for r in rest)  # fmt: skip
    arguments = first["function"]["arguments"] + "".join(r["function"]["arguments"] for r in rest)
    check_weather_arguments(arguments)
    assert not any(d.get("content") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("model", FAMILIES)
def test_a_named_choice_is_one_call_even_when_parallel_calls_are_allowed(
    tools: Tools, model: str
) -> None:
    # instructor and the Vercel AI SDK name the tool and never send parallel_tool_calls
    reply = tools.post(
        model=model, messages=QUESTION, tools=[WEATHER, TIME], max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    check_weather_arguments(calls[0]["function"]["arguments"])


def test_openai_stream_helper_accumulates_the_call(tools: Tools) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    with tools.client().chat.completions.stream(
        model="qwen", messages=QUESTION, tools=[WEATHER], tool_choice=choice,  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=60,
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    check_weather_arguments(calls[0].function.arguments)


@pytest.mark.parametrize("model", FAMILIES)
def test_a_call_its_result_and_the_answer(tools: Tools, model: str) -> None:
    client = tools.client()
    first = client.chat.completions.create(
        model=model, messages=QUESTION, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=60,
    )  # fmt: skip
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history = [
        *QUESTION,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
    ]
    second = client.chat.completions.create(
        model=model,
        messages=history,
        tools=[WEATHER],
        temperature=0,
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result are part of the prompt
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_parallel_calls(tools: Tools) -> None:
    reply = tools.post(model="mistral", tools=[WEATHER, TIME], tool_choice="required",
                       max_tokens=120).json()  # fmt: skip
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert len(calls) >= 2
    assert [c["function"]["name"] for c in calls] != []
    assert len({c["id"] for c in calls}) == len(calls)


def test_auto_starts_a_call_and_the_grammar_holds_it(tools: Tools) -> None:
    # the generic prompt shows the markup; the demo model copies it, and from its
    # <tool_call> on the lazy grammar turns "<function-name>" into a real call
    reply = tools.post(model="gemma", tools=[WEATHER], max_tokens=160).json()
    choice = reply["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    if choice["finish_reason"] == "tool_calls":
        check_weather_arguments(calls[0]["function"]["arguments"])
    # no call leaks into the text (the model may still write the tag's name in prose)
    content = choice["message"]["content"] or ""
    assert '"name"' not in content and "</tool_call>\n" not in content


def test_calls_or_an_answer_in_the_response_format(tools: Tools) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
              "required": ["answer"]}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    for model in ("gemma", "qwen"):
        reply = tools.post(model=model, tools=[WEATHER], response_format=response_format,
                           max_tokens=80)  # fmt: skip
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        if choice["message"].get("tool_calls"):
            assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        else:
            assert choice["finish_reason"] == "stop"
            assert isinstance(json.loads(choice["message"]["content"])["answer"], str)


def test_tool_choice_none_answers_in_text(tools: Tools) -> None:
    with_none = tools.post(model="qwen", tools=[WEATHER], tool_choice="none").json()
    without = tools.post(model="qwen").json()
    assert with_none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    assert "tool_calls" not in with_none["choices"][0]["message"]


def test_legacy_functions(tools: Tools) -> None:
    reply = tools.client().chat.completions.create(
        model="llama", messages=QUESTION, functions=[WEATHER["function"]],
        function_call={"name": "get_weather"}, temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    check_weather_arguments(choice.message.function_call.arguments)
    assert choice.message.tool_calls is None
    history = [
        *QUESTION,
        {"role": "assistant", "content": None,
         "function_call": choice.message.function_call.model_dump()},
        {"role": "function", "name": "get_weather", "content": "Rain"},
    ]  # fmt: skip
    again = tools.post(model="llama", messages=history, max_tokens=4)
    assert again.status_code == 200, again.text


def test_n_choices_each_call(tools: Tools) -> None:
    reply = tools.post(model="qwen", tools=[WEATHER], tool_choice="required", n=2,
                       parallel_tool_calls=False, temperature=0.9, seed=1,
                       max_tokens=160).json()  # fmt: skip
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        check_weather_arguments(choice["message"]["tool_calls"][0]["function"]["arguments"])


def test_calls_are_remembered_in_chat_history(tools: Tools) -> None:
    headers = {"X-Session-ID": "agent-1"}
    with tools.server.http(tools.token) as http:
        first = http.post("/v1/chat/completions", headers=headers, json={
            "model": "memo", "messages": QUESTION, "tools": [WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False, "temperature": 0, "max_tokens": 60}).json()  # fmt: skip
        call = first["choices"][0]["message"]["tool_calls"][0]
        result = {"role": "tool", "tool_call_id": call["id"], "content": "Sunny"}
        second = http.post("/v1/chat/completions", headers=headers, json={
            "model": "memo", "messages": [result], "tools": [WEATHER],
            "max_tokens": 4})  # fmt: skip
    assert second.status_code == 200, second.text
    assert second.json()["session"]["turns_used"] == 1
    # the stored call is rendered back: the prompt holds the question, call and result
    assert second.json()["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 10


def test_langchain_bind_tools_and_function_calling(tools: Tools) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city, in celsius or fahrenheit."""
        return "Sunny"

    class Weather(BaseModel):
        """A weather report."""

        city: str
        degrees: int

    llm = ChatOpenAI(base_url=tools.server.base_url, api_key=tools.token,  # type: ignore[arg-type]
                     model="qwen", temperature=0, max_tokens=60)  # fmt: skip
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    assert message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}  # type: ignore[attr-defined]
    report = llm.with_structured_output(Weather, method="function_calling").invoke(
        "Report the weather in Paris."
    )
    assert isinstance(report, Weather) and isinstance(report.degrees, int)


# wrong and hostile input


def test_mistral_template_refuses_call_ids_it_cannot_render(tools: Tools) -> None:
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type":
         "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny"},
    ]  # fmt: skip
    response = tools.post(model="mistral", messages=history)
    assert response.status_code == 400
    assert "length 9" in error_of(response)["message"]


@pytest.mark.parametrize("kind", ["web_search", "custom", "code_interpreter"])
def test_tools_other_than_functions_are_refused(tools: Tools, kind: str) -> None:
    response = tools.post(model="qwen", tools=[{"type": kind}])
    assert response.status_code == 400
    err = error_of(response)
    assert err["code"] == "unsupported_parameter" and err["param"] == "tools[0]"


def test_hostile_tool_names_and_schemas(tools: Tools) -> None:
    evil = {"type": "function", "function": {"name": 'x"; root ::= ', "parameters": {}}}
    assert tools.post(model="gemma", tools=[evil]).status_code == 400
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(12):  # (the body may nest 64 levels)
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    nested = {"type": "function", "function": {"name": "deep", "parameters": deep}}
    response = tools.post(model="gemma", tools=[nested], tool_choice="required", max_tokens=30)
    assert response.status_code == 200, response.text
    remote = {"$ref": "https://example.com/x.json"}
    weird = {"type": "function", "function": {"name": "w", "parameters": {
        "type": "object", "properties": {"v": remote}}}}  # fmt: skip
    response = tools.post(model="gemma", tools=[weird], tool_choice="required")
    assert response.status_code == 400
    assert error_of(response)["param"] == "tools"
    # the assistant is still there for everyone
    assert tools.post(model="gemma", max_tokens=2).status_code == 200


# schemas with references, as pydantic writes any nested model


class Place(BaseModel):
    city: str
    country: str


class Trip(BaseModel):
    """A trip between two places."""

    start: Place
    end: Place
    days: int


def test_nested_models_in_tools_through_pydantic_ai(tools: Tools) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    assert "$defs" in Trip.model_json_schema()
    provider = OpenAIProvider(base_url=tools.server.base_url, api_key=tools.token)
    agent = Agent(
        OpenAIChatModel("qwen", provider=provider),
        output_type=Trip,
        model_settings=ModelSettings(temperature=0, max_tokens=90),
    )
    trip = agent.run_sync("Plan a trip from Paris to Rome.").output
    assert isinstance(trip, Trip) and isinstance(trip.start, Place)


def test_nested_models_in_tools_through_openai_agents(tools: Tools) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    booked: list[Trip] = []

    @function_tool
    def book(trip: Trip) -> str:
        """Book a trip."""
        booked.append(trip)
        return "booked"

    client = openai.AsyncOpenAI(base_url=tools.server.base_url, api_key=tools.token)
    agent = Agent(
        name="travel",
        model=OpenAIChatCompletionsModel(model="qwen", openai_client=client),
        tools=[book],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="book", temperature=0, max_tokens=90),
    )
    result = Runner.run_sync(agent, "Book a trip from Paris to Rome.", max_turns=2)
    assert result.final_output == "booked"
    assert len(booked) == 1 and isinstance(booked[0].end, Place)


def draft07(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as draft-07 writes it: ``definitions``, not ``$defs``."""
    text = json.dumps(schema).replace("$defs", "definitions")
    return dict(json.loads(text))


@pytest.mark.parametrize("dialect", [dict, draft07])
@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_tool_parameters_with_references(tools: Tools, choice: str, dialect: Any) -> None:
    # instructor's tools mode sends this: the model's schema, the one tool named
    trip = {"type": "function", "function": {"name": "Trip",
            "parameters": dialect(Trip.model_json_schema())}}  # fmt: skip
    # a recursive one beside it: its refs are to its own root
    tree = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"label": {"type": "string"},
                                         "children": {"type": "array", "items": {"$ref": "#"},
                                                      "maxItems": 1}},
        "required": ["label"]}}}  # fmt: skip
    named = {"type": "function", "function": {"name": "Trip"}}
    reply = tools.post(
        model="qwen", tools=[trip, tree], max_tokens=90,
        messages=[{"role": "user", "content": "Plan a trip from Paris to Rome."}],
        tool_choice=named if choice == "named" else choice,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    calls = reply.json()["choices"][0]["message"].get("tool_calls") or []
    assert choice == "auto" or calls
    for call in calls:
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "Trip":
            Trip.model_validate(args)
        else:
            assert isinstance(args["label"], str)
