"""Tool calls parsed out of streamed text, the formats read off real templates, their prompts.

No model here: the parser is fed each family's output split at every token
boundary, and the templates (copies of llama.cpp's, in tests/data) render
tools, calls and results as their models expect.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher

from vergeai.api.outputs import Answer
from vergeai.api.tools import parse_tools
from vergeai.errors import InvalidRequest
from vergeai.runtime import toolformats
from vergeai.runtime.constraint import GrammarSpec, grammar_source
from vergeai.runtime.job import Delta
from vergeai.runtime.prompt import ChatTemplate
from vergeai.runtime.templates import BUILTIN
from vergeai.runtime.toolcalls import Syntax, ToolCallParser
from vergeai.runtime.toolformats import GENERIC, HERMES, LLAMA3, MISTRAL

DATA = Path(__file__).parent / "data"
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", '"name"', "tool_call")

QWEN_TWO_CALLS = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Pa}ri\\"s", "days": [1, {"n": 2}]}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
MISTRAL_TWO_CALLS = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, '
    '{"name": "get_time", "arguments": {}}]'
)
LLAMA_CALL = ' {"name": "get_weather", "parameters": {"city": "[Paris]"}}'
CASES: list[tuple[Syntax, str, str, list[tuple[str, str]]]] = [
    (
        HERMES.syntax,
        QWEN_TWO_CALLS,
        "Let me check.\n",
        [
            ("get_weather", '{"city": "Pa}ri\\"s", "days": [1, {"n": 2}]}'),
            ("get_time", '{"tz": "CET"}'),
        ],
    ),
    (
        MISTRAL.syntax,
        MISTRAL_TWO_CALLS,
        "",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (LLAMA3.syntax, LLAMA_CALL, "", [("get_weather", '{"city": "[Paris]"}')]),
    # keys in another order: the call comes whole when its object closes
    (
        HERMES.syntax,
        '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call> Done. Bye',
        "Done. Bye",
        [("f", '{"a": 1}')],
    ),
    # not a call after all: the text is the model's answer
    (HERMES.syntax, "a <tool_call>{oops}</tool_call> b", "a <tool_call>{oops}</tool_call> b", []),
    (HERMES.syntax, "x < y and <tool y", "x < y and <tool y", []),
    (LLAMA3.syntax, '{"answer": 42}', '{"answer": 42}', []),
    (
        LLAMA3.syntax,
        'Sure: {"name": "f", "parameters": {}}',
        'Sure: {"name": "f", "parameters": {}}',
        [],
    ),
]


def run(syntax: Syntax, pieces: list[str], parallel: bool = True) -> tuple[list[str], Any, Any]:
    ids = (f"id{i}" for i in itertools.count())
    parser = ToolCallParser(syntax, lambda: next(ids), parallel)
    contents, deltas = [], []
    for piece in pieces:
        content, more = parser.feed(piece)
        contents.append(content)
        deltas.extend(more)
    content, more = parser.flush()
    contents.append(content)
    deltas.extend(more)
    return contents, deltas, parser.calls


def splits(text: str, cuts: int) -> list[list[str]]:
    out = []
    for points in itertools.combinations(range(1, len(text)), cuts):
        bounds = [0, *points, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


@pytest.mark.parametrize("syntax,text,content,calls", CASES)
def test_every_split_gives_the_same_calls_and_no_markup_in_content(
    syntax: Syntax, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for pieces in [[text], *splits(text, 1), *splits(text, 2)[::7]]:
        contents, deltas, parsed = run(syntax, pieces)
        assert "".join(contents) == content, pieces
        assert [(c.name, c.arguments) for c in parsed] == calls, pieces
        if calls:
            assert not any(m in c for c in contents for m in MARKUP), (pieces, contents)
        # each call is named once, first, then its arguments follow in order
        for index, (name, arguments) in enumerate(calls):
            own = [d for d in deltas if d.index == index]
            assert own[0].name == name and own[0].id == f"id{index}", pieces
            assert all(d.id is None and d.name is None for d in own[1:]), pieces
            assert "".join(d.arguments for d in own) == arguments, pieces


def test_arguments_stream_in_pieces_as_they_come() -> None:
    pieces = [QWEN_TWO_CALLS[i : i + 3] for i in range(0, len(QWEN_TWO_CALLS), 3)]
    _, deltas, _ = run(HERMES.syntax, pieces)
    assert len([d for d in deltas if d.index == 0 and d.arguments]) > 5


def test_a_call_cut_short_keeps_its_arguments_and_a_cut_opener_is_dropped() -> None:
    contents, _, calls = run(HERMES.syntax, ['Hi <tool_call>{"name": "f", "arguments": {"a": "b'])
    assert "".join(contents) == "Hi " and calls[0].arguments == '{"a": "b'
    contents, _, calls = run(HERMES.syntax, ['<tool_call>{"name": "f", "arguments": {}}<tool_ca'])
    assert "".join(contents) == "" and len(calls) == 1
    contents, _, calls = run(HERMES.syntax, ['Hi <tool_call>{"name": "f'])
    assert "".join(contents) == "Hi " and calls == []


def test_one_call_only_when_parallel_calls_are_off() -> None:
    contents, _, calls = run(HERMES.syntax, [QWEN_TWO_CALLS], parallel=False)
    assert [c.name for c in calls] == ["get_weather"]
    assert "get_time" in "".join(contents)


def test_reasoning_is_split_off_before_calls_are_parsed() -> None:
    parser = ToolCallParser(HERMES.syntax, lambda: "id", True)
    answer = Answer(raw=False, opens_think=False, logprobs=False, calls=parser)
    text = (
        '<think>I should call f.</think>\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    )
    pieces = [answer.feed(Delta(text[i : i + 4]), 0) for i in range(0, len(text), 4)]
    pieces.append(answer.flush(0))
    assert "".join(p.reasoning for p in pieces) == "I should call f."
    assert "".join(p.content for p in pieces) == ""
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [("f", "{}")]


# formats and prompts of real templates


def template(name: str) -> ChatTemplate:
    return ChatTemplate((DATA / name).read_text(), "<s>", "</s>")


WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "a1b2c3d4e",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "Sunny"},
]


@pytest.mark.parametrize(
    "name,fmt",
    [("qwen3-tools.jinja", HERMES), ("llama-3.2.jinja", LLAMA3), ("mistral-nemo.jinja", MISTRAL)],
)
def test_formats_are_read_off_the_templates(name: str, fmt: toolformats.ToolFormat) -> None:
    assert template(name).tool_format == fmt


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_get_the_generic_format(name: str) -> None:
    assert ChatTemplate(BUILTIN[name], "<s>", "</s>").tool_format == GENERIC


def test_qwen3_renders_tools_calls_and_results_its_own_way() -> None:
    prompt = template("qwen3-tools.jinja").render(ROUND_TRIP, tools=[WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in prompt
    assert "<|im_start|>user\n<tool_response>\nSunny\n</tool_response><|im_end|>" in prompt


def test_llama3_renders_a_call_with_parameters_and_the_result_as_ipython() -> None:
    prompt = template("llama-3.2.jinja").render(ROUND_TRIP, tools=[WEATHER])
    assert '"parameters"' in prompt and "get_weather" in prompt.split("<|eot_id|>")[1]
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"Sunny"<|eot_id|>' in prompt


def test_mistral_renders_calls_with_their_nine_character_ids() -> None:
    prompt = template("mistral-nemo.jinja").render(ROUND_TRIP, tools=[WEATHER])
    assert "[AVAILABLE_TOOLS]" in prompt
    assert (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]'
        in prompt
    )
    assert '[TOOL_RESULTS]{"content": Sunny, "call_id": "a1b2c3d4e"}[/TOOL_RESULTS]' in prompt
    assert len(MISTRAL.new_id()) == 9 and MISTRAL.new_id().isalnum()


def test_a_template_without_tools_gets_them_described_and_calls_as_markup() -> None:
    prompt = ChatTemplate(BUILTIN["gemma"], "<bos>", "<eos>").render(ROUND_TRIP, tools=[WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<start_of_turn>model\n{call}<end_of_turn>" in prompt
    assert "<start_of_turn>user\n<tool_response>\nSunny\n</tool_response><end_of_turn>" in prompt


def test_tool_choice_none_renders_no_tools() -> None:
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None


def test_tool_schemas_keep_what_the_grammar_can_hold() -> None:
    """A tool's keyword the engine cannot enforce is left out (lenient); a response_format's
    is refused."""
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    ranged = {**WEATHER["function"], "parameters": {
        "type": "object", "properties": {"days": unique}}}  # fmt: skip
    tools = parse_tools({"tools": [{"type": "function", "function": ranged}]})
    assert tools is not None
    spec = tools.grammar(HERMES)
    assert spec.kind == "lark" and spec.markers == ("<tool_call>", "</tool_call>")
    assert LLMatcher.validate_grammar(grammar_source(spec, {})) == ""
    strict = grammar_source(GrammarSpec.schema(unique, "response_format"), {})
    assert "uniqueItems" in LLMatcher.validate_grammar(strict)


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3, GENERIC], ids=lambda f: f.name)
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("answer", [None, {"type": "object"}])
@pytest.mark.parametrize("choice", ["auto", "required", "get_time"])
def test_every_tool_grammar_is_valid(
    fmt: toolformats.ToolFormat, parallel: bool, answer: dict[str, Any] | None, choice: str
) -> None:
    time = {"type": "function", "function": {"name": "get_time"}}
    named = {"type": "function", "function": {"name": choice}}
    tools = parse_tools({"tools": [WEATHER, time], "parallel_tool_calls": parallel,
                         "tool_choice": named if choice == "get_time" else choice})  # fmt: skip
    assert tools is not None
    spec = tools.grammar(fmt, answer, lazy=choice == "auto")
    assert LLMatcher.validate_grammar(grammar_source(spec, {})) == ""
    assert spec.triggers == ((fmt.trigger(),) if choice == "auto" else ())


FRAGMENTS = ['<tool_call>', '</tool_call>', '[TOOL_CALLS]', '{"name": "', '"arguments": ',
             '"parameters": ', "{", "}", "[", "]", ",", '"', "\\", "\\q", "a", " ", "\n",
             "<", "<tool", '{"name"', ":"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=30),
    st.sampled_from([HERMES.syntax, MISTRAL.syntax, LLAMA3.syntax]),
)
def test_any_text_parses_without_error(pieces: list[str], syntax: Syntax) -> None:
    contents, deltas, calls = run(syntax, pieces)
    assert len("".join(contents)) <= len("".join(pieces))  # nothing made up
    for index, call in enumerate(calls):
        own = [d for d in deltas if d.index == index]
        assert own[0].name == call.name
        assert "".join(d.arguments for d in own) == call.arguments


@pytest.mark.parametrize(
    "source",
    [*(f.name for f in sorted(DATA.glob("*.jinja"))), *(f"builtin:{n}" for n in sorted(BUILTIN))],
)
def test_every_template_leaves_a_prefill_open(source: str) -> None:
    text = BUILTIN[source[8:]] if source.startswith("builtin:") else (DATA / source).read_text()
    chat = ChatTemplate(text, "<s>", "</s>")
    asked = [{"role": "user", "content": "Describe Paris."}]
    begun = chat.render([*asked, {"role": "assistant", "content": '{"city": "Paris",'}],
                        continue_final=True)  # fmt: skip
    assert begun.endswith('{"city": "Paris",')
    # the prompt is the generation prompt's, the answer begun after it (a think block the
    # generation prompt opens is not: the prefill is the answer itself)
    opened = chat.render(asked)
    assert begun.startswith(opened.removesuffix("<think>\n"))


def test_a_prefill_the_template_does_not_write_as_given_is_refused() -> None:
    chat = ChatTemplate((DATA / "deepseek-r1.jinja").read_text(), "<s>", "</s>")
    asked = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>x</think>{"},
    ]
    with pytest.raises(InvalidRequest, match="cannot be continued") as refused:
        chat.render(asked, continue_final=True)  # r1's template drops the reasoning
    assert refused.value.param == "messages"
