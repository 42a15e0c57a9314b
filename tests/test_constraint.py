"""The grammar engine's wrapper on the real demo vocabulary: schemas as compiled, lazy starts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from vergeai.api.tools import parse_tools
from vergeai.runtime.constraint import (
    GrammarSpec,
    NoTokenAllowed,
    compile_grammar,
    json_schema_text,
)
from vergeai.runtime.llama import Model
from vergeai.runtime.toolformats import HERMES

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    model = Model(model_path, 0)
    yield model
    model.free()


def sent(schema: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(json_schema_text(schema))
    del value["x-guidance"]
    return dict(value)


def test_schemas_are_closed_and_bounded_as_llama_cpp_read_them() -> None:
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "integer"}, "n": {"enum": [{"type": "integer"}]}},
        "$defs": {"additionalProperties": {"type": "object", "properties": {"a": {}}}},
        "allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}],
    }
    out = sent(schema)
    assert out["additionalProperties"] is False
    # a property or definition named like a keyword is a name, and enum values are values
    assert out["properties"]["properties"]["maximum"] == 10**16 - 1
    assert out["properties"]["n"] == {"enum": [{"type": "integer"}]}
    assert out["$defs"]["additionalProperties"]["additionalProperties"] is False
    # the parts of an allOf add up: none of them alone closes the object
    assert all("additionalProperties" not in part for part in out["allOf"])
    assert sent({"type": "object", "properties": {}, "additionalProperties": True})[
        "additionalProperties"
    ] is True  # fmt: skip


def tokens_of(model: Model, text: str) -> list[tuple[int, str]]:
    return [(t, model.piece(t).decode("utf-8", "replace")) for t in model.tokenize(text, False)]


def test_a_lazy_tool_grammar_starts_at_the_call_marker(model: Model) -> None:
    tools = parse_tools({"tools": [WEATHER]})
    assert tools is not None
    spec = tools.grammar(HERMES, lazy=True)
    grammar = compile_grammar(model.grammar_tokenizer(), spec, model.special_tokens(spec.markers))
    constraint = grammar.start()
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    for token, text in tokens_of(model, "Let me check the <tool> weather.\n"):
        constraint.mask(logits)  # masks nothing before a call starts
        assert np.isfinite(logits).all()
        constraint.accept(token, text)
    assert not constraint.active
    for token, text in tokens_of(model, "<tool_call>\n"):
        constraint.accept(token, text)
    assert constraint.active  # the marker was seen: from here the call is held to the tools
    for token, text in tokens_of(model, '{"name": "get_weather", "arguments": {"city": "Oslo"}}'):
        constraint.mask(logits)
        assert np.isfinite(logits[token]), text
        constraint.accept(token, text)
        logits[:] = 0
    constraint.mask(logits)
    wrong = model.tokenize(" Sure", False)[0]
    assert not np.isfinite(logits[wrong])  # only the call's end may follow
    with pytest.raises(NoTokenAllowed, match="cannot follow the grammar"):
        constraint.accept(wrong, " Sure")


def test_a_grammar_that_cannot_go_on_ends_its_request_with_the_reason(model: Model) -> None:
    spec = GrammarSpec.schema({"type": "string", "pattern": "^a{100000000}$"}, "response_format")
    constraint = compile_grammar(model.grammar_tokenizer(), spec, {}).start()
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    constraint.mask(logits)
    quote = model.tokenize('"', False)[0]
    with pytest.raises(NoTokenAllowed, match="too many expressions"):
        constraint.accept(quote, '"')
