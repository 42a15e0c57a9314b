"""Thinking models, for real: the demo GGUF re-labelled with Qwen3 and DeepSeek-R1 templates.

No thinking model ships on the package registries, so the demo model gets
their chat templates written into its metadata (with the `gguf` package),
and a llama.cpp grammar makes it emit `<think>…</think>answer` on demand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Server, cli_ok, eventually, free_port, relabel

from vergeai.runtime.llama import read_chat_template
from vergeai.runtime.prompt import ChatTemplate
from vergeai.runtime.reasoning import close_open_think

DATA = Path(__file__).parent / "data"
R1_ASSISTANT = "<\uff5cAssistant\uff5c>"  # DeepSeek's full-width bars
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
WORDS = "word ::= [a-z]{1,8}"
# the model thinks, closes the block, then answers; both parts bounded
THINK_THEN_ANSWER = f"""root ::= "<think>" thought "</think>" answer
thought ::= word (" " word){{2,4}}
answer ::= " " word (" " word){{1,3}} "."
{WORDS}"""
# for a prompt that already opened <think>: the model only closes it
CLOSE_THEN_ANSWER = f"""root ::= thought "</think>" answer
thought ::= word (" " word){{2,4}}
answer ::= " " word (" " word){{1,3}} "."
{WORDS}"""
LONG_THOUGHT = f"""root ::= "<think>" word (" " word){{40,60}} "</think>" " " word
{WORDS}"""
PLAIN_ANSWER = f"""root ::= word (" " word){{1,3}} "."
{WORDS}"""


@dataclass
class Thinking:
    server: Server
    token: str
    qwen: str
    r1: str

    def chat(self, model: str, **body: Any) -> dict[str, Any]:
        with self.server.http(self.token) as http:
            response = http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": QUESTION, "temperature": 0, **body},
            )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stream(self, model: str, **body: Any) -> list[dict[str, Any]]:
        payload = {"model": model, "messages": QUESTION, "temperature": 0, "stream": True, **body}
        deltas = []
        with (
            self.server.http(self.token) as http,
            http.stream("POST", "/v1/chat/completions", json=payload) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        deltas.append(chunk["choices"][0]["delta"])
        return deltas


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Thinking]:
    root = tmp_path_factory.mktemp("thinking")
    qwen = relabel(model_path, root / "qwen3.gguf", DATA / "qwen3.jinja")
    r1 = relabel(model_path, root / "r1.gguf", DATA / "deepseek-r1.jinja")
    state = root / "state"
    common = ["--threads", "2", "--ctx", "512"]
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "qwen", "--model", qwen, *common, "--parallel", "2")
    cli_ok(
        state, "assistant", "create", "qwen-nothink", "--model", qwen, *common, "--disable-think"
    )
    cli_ok(state, "assistant", "create", "r1", "--model", r1, *common)
    cli_ok(state, "assistant", "create", "r1-nothink", "--model", r1, *common, "--disable-think")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, *common,
           "--chat-format", "gemma", "--disable-think")  # fmt: skip
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Thinking(server, token, qwen, r1)
    finally:
        server.stop()


# rendered prompts


def test_qwen3_template_disables_thinking_with_an_empty_block(thinking: Thinking) -> None:
    source = read_chat_template(thinking.qwen)
    assert source is not None and "enable_thinking" in source
    template = ChatTemplate(source, "<bos>", "<eos>")
    off = template.render(QUESTION, enable_thinking=False)
    on = template.render(QUESTION, enable_thinking=True)
    default = template.render(QUESTION)
    assert off == (
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert (
        on == default == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_r1_template_gets_its_open_block_closed(thinking: Thinking) -> None:
    source = read_chat_template(thinking.r1)
    assert source is not None and "enable_thinking" not in source
    prompt = ChatTemplate(source, "<bos>", "<eos>").render(QUESTION, enable_thinking=False)
    assert prompt.endswith(R1_ASSISTANT + "<think>\n")
    assert close_open_think(prompt).endswith(R1_ASSISTANT + "<think>\n\n</think>\n\n")


def test_disable_think_costs_prompt_tokens_not_answer_tokens(thinking: Thinking) -> None:
    def prompt_tokens(model: str, **body: Any) -> int:
        return int(thinking.chat(model, max_tokens=1, **body)["usage"]["prompt_tokens"])

    on, off = prompt_tokens("qwen"), prompt_tokens("qwen-nothink")
    assert off > on, "the empty think block is part of the prompt"
    # per request, chat_template_kwargs overrides the assistant's setting both ways
    kwargs_off = {"chat_template_kwargs": {"enable_thinking": False}}
    kwargs_on = {"chat_template_kwargs": {"enable_thinking": True}}
    assert prompt_tokens("qwen", **kwargs_off) == off
    assert prompt_tokens("qwen-nothink", **kwargs_on) == on
    r1_on, r1_off = prompt_tokens("r1"), prompt_tokens("r1-nothink")
    assert r1_off > r1_on
    assert prompt_tokens("r1", **kwargs_off) == r1_off
    # a template without thinking ignores the switch
    assert prompt_tokens("gemma") == prompt_tokens("gemma", **kwargs_on)


# splitting reasoning from content


def test_reasoning_is_split_from_content(thinking: Thinking) -> None:
    raw = thinking.chat("qwen", max_tokens=80, grammar=THINK_THEN_ANSWER, reasoning_format="none")
    text = raw["choices"][0]["message"]["content"]
    assert text.startswith("<think>") and "</think>" in text
    inner, after = text[len("<think>") :].split("</think>")
    split = thinking.chat("qwen", max_tokens=80, grammar=THINK_THEN_ANSWER)
    message = split["choices"][0]["message"]
    assert message["reasoning_content"] == inner
    assert message["content"] == after
    assert "<" not in message["content"] and "think" not in message["content"]
    assert split["choices"][0]["finish_reason"] == "stop"
    # usage counts every generated token, reasoning included
    assert split["usage"]["completion_tokens"] == raw["usage"]["completion_tokens"]
    assert split["usage"]["completion_tokens"] == split["timings"]["predicted_n"]


def test_streamed_tags_split_across_tokens_never_leak(thinking: Thinking) -> None:
    raw = thinking.stream("qwen", max_tokens=80, grammar=THINK_THEN_ANSWER, reasoning_format="none")
    pieces = [d.get("content") or "" for d in raw]
    assert "<think>" in "".join(pieces)
    assert not any("<think>" in p for p in pieces), "the tag arrives in several tokens"
    deltas = thinking.stream("qwen", max_tokens=80, grammar=THINK_THEN_ANSWER)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    whole = thinking.chat("qwen", max_tokens=80, grammar=THINK_THEN_ANSWER)["choices"][0]
    assert reasoning == whole["message"]["reasoning_content"]
    assert content == whole["message"]["content"]
    for d in deltas[1:]:
        assert "<" not in (d.get("content") or "") + (d.get("reasoning_content") or "")
    assert deltas[0] == {"role": "assistant", "content": None}


def test_prompt_opened_think_block_is_reasoning(thinking: Thinking) -> None:
    reply = thinking.chat("r1", max_tokens=80, grammar=CLOSE_THEN_ANSWER)["choices"][0]
    assert reply["message"]["reasoning_content"]
    assert reply["message"]["content"] and "</think>" not in reply["message"]["content"]
    nothink = thinking.chat("r1-nothink", max_tokens=40, grammar=PLAIN_ANSWER)["choices"][0]
    assert "reasoning_content" not in nothink["message"]
    assert nothink["message"]["content"].endswith(".")


def test_budget_spent_thinking_gives_length_and_empty_content(thinking: Thinking) -> None:
    said = "assistant qwen ran out of tokens while thinking"
    before = thinking.server.log().count(said)
    reply = thinking.chat("qwen", max_tokens=10, grammar=LONG_THOUGHT)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert choice["message"]["reasoning_content"]
    assert reply["usage"]["completion_tokens"] == 10
    eventually(lambda: thinking.server.log().count(said) > before, what="the warning logged")
    warning = thinking.server.log().split(said)[-1].splitlines()[0]
    assert "--disable-think" in warning


def test_template_without_thinking_still_keeps_reasoning_out(thinking: Thinking) -> None:
    message = thinking.chat("gemma", max_tokens=80, grammar=THINK_THEN_ANSWER)["choices"][0][
        "message"
    ]
    assert message["reasoning_content"] and "<think>" not in message["content"]


def test_a_grammar_llama_cpp_cannot_parse_is_400(thinking: Thinking) -> None:
    """Options refused without a model (thinking flags, a non-string grammar) are
    tested in test_api_fast.py; this one takes the model's grammar parser."""
    body = {"model": "qwen", "messages": QUESTION, "grammar": "root ::= ("}
    with thinking.server.http(thinking.token) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "grammar"


def test_show_tells_thinking_control(thinking: Thinking) -> None:
    state = thinking.server.state_dir

    def control(name: str) -> str:
        return str(
            json.loads(cli_ok(state, "assistant", "show", name, "--json"))["thinking_control"]
        )

    assert control("qwen").startswith("yes")
    assert control("r1").startswith("by closing")
    assert control("gemma").startswith("no")
    shown = json.loads(cli_ok(state, "assistant", "show", "qwen", "--json"))
    assert shown["chat_template"] == "gguf"


def test_openai_client_sees_reasoning_content(thinking: Thinking) -> None:
    client = thinking.server.client(thinking.token)
    reply = client.chat.completions.create(
        model="qwen",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=80,
        temperature=0,
        extra_body={"grammar": THINK_THEN_ANSWER},
    )
    message = reply.choices[0].message
    assert (message.model_extra or {})["reasoning_content"]
    assert message.content and "think" not in message.content


def test_structured_output_turns_thinking_off(thinking: Thinking) -> None:
    schema = {"type": "object", "properties": {"blue": {"type": "boolean"}}, "required": ["blue"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "sky", "schema": schema}}
    off = thinking.chat("qwen", max_tokens=1, chat_template_kwargs={"enable_thinking": False})

    def r1_online() -> bool:
        health = httpx.get(f"{thinking.server.root_url}/health").json()
        return bool(health["assistants"]["r1"] == "online")

    eventually(r1_online, timeout=30, what="r1 online")
    for model in ("qwen", "r1"):
        reply = thinking.chat(model, max_tokens=30, response_format=fmt)
        message = reply["choices"][0]["message"]
        assert "reasoning_content" not in message
        assert isinstance(json.loads(message["content"])["blue"], bool)
    structured = thinking.chat("qwen", max_tokens=1, response_format=fmt)
    assert structured["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]
