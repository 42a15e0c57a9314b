"""How a chat template's model family calls tools: the wire format, its grammar, its markup.

The format is read off the template, as llama.cpp's server does:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, once per
  call (Qwen 2.5/3, QwQ, Hermes 2 Pro/3 and the many templates derived from them);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral Nemo,
  Small, Devstral), with the 9-character call ids its templates insist on;
- ``llama3``: ``{"name": ..., "parameters": {...}}`` as the whole answer, one call
  (Llama 3.1, 3.2, 3.3);
- ``generic``: any other template. It gets no ``tools`` (it may not know them);
  instead the system message describes the tools and asks for the Hermes markup,
  and earlier calls and results are written into the messages as that markup.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

from vergeai.runtime.toolcalls import Syntax

Message = dict[str, Any]
ALPHANUMERIC = string.ascii_letters + string.digits
WS = "TOOL_WS"  # the whitespace terminal between markers and calls


@dataclass(frozen=True)
class ToolFormat:
    name: str
    syntax: Syntax
    args_key: str  # what the call's JSON names its arguments
    native: bool  # the template renders tools and calls itself
    parallel: bool  # the format can carry several calls in one answer
    id_length: int = 0  # call ids of exactly this many alphanumerics (Mistral); 0: OpenAI's

    def new_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(ALPHANUMERIC) for _ in range(self.id_length))
        return "call_" + "".join(secrets.choice(ALPHANUMERIC) for _ in range(24))

    @property
    def markers(self) -> tuple[str, ...]:
        """The markup around calls, as a grammar's ``marker_i`` rules name it (a model may
        have each as one special token)."""
        if self.name == "llama3":
            return ()
        if self.name == "mistral":
            return ("[TOOL_CALLS]",)
        return (self.syntax.opener, self.syntax.closer or "")

    def lark(self, call_rule: str, parallel: bool, name: str = "start") -> str:
        """The Lark rule for the calls: one, or several where the format and request allow."""
        if self.name == "llama3":
            return f"{name}: {call_rule}"
        if self.name == "mistral":
            more = f' ({WS}? "," {WS}? {call_rule})*' if parallel else ""
            rule = f'marker_0 {WS}? "[" {WS}? {call_rule}{more} {WS}? "]"'
        else:
            one = f"marker_0 {WS}? {call_rule} {WS}? marker_1"
            rule = one + (f" ({WS}? {one})*" if parallel else "")
        return f"{name}: {rule}\n{WS}: /[ \\t\\n]{{1,4}}/"

    def trigger(self) -> str:
        """llama.cpp's lazy-grammar pattern: the grammar starts where a call starts.

        The pattern matches only when the text so far ends with the opener
        (and a little whitespace), so what the grammar is fed always fits it.
        """
        if self.name == "llama3":
            return r'^[ \t\n]{0,4}(\{"name": ?")$'
        opener = "".join("\\" + c if c in "[]" else c for c in self.syntax.opener)
        return f"({opener})[ \\t\\n]{{0,4}}$"


HERMES_SYNTAX = Syntax("<tool_call>", closer="</tool_call>")
HERMES = ToolFormat("hermes", HERMES_SYNTAX, "arguments", native=True, parallel=True)
GENERIC = ToolFormat("generic", HERMES_SYNTAX, "arguments", native=False, parallel=True)
MISTRAL = ToolFormat(
    "mistral", Syntax("[TOOL_CALLS]", array=True), "arguments", True, True, id_length=9
)
LLAMA3 = ToolFormat(
    "llama3",
    Syntax('{"name"', at_start=True, opener_in_json=True),
    "parameters",
    native=True,
    parallel=False,
)


def detect(source: str) -> ToolFormat:
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<tool_call>" in source:
        return HERMES
    if "<|start_header_id|>" in source and "tools" in source and '"parameters"' in source:
        return LLAMA3
    return GENERIC


TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def with_tools_described(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """For a template that knows no tools: describe them at the end of the system message."""
    text = tools_prompt(tools)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_as_text(messages: list[Message]) -> list[Message]:
    """For a template that knows no tools: calls and results written as Hermes markup.

    An assistant's calls join its content; tool results become one user
    message per run of results, so roles still alternate.
    """
    out: list[Message] = []
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        elif message.get("tool_calls"):
            calls = [_call_text(call["function"]) for call in message["tool_calls"]]
            content = "\n".join([message["content"], *calls] if message["content"] else calls)
            out.append({"role": "assistant", "content": content})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _call_text(function: dict[str, Any]) -> str:
    arguments = parsed_arguments(function["arguments"])
    call = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def parsed_arguments(arguments: str) -> Any:
    """A call's arguments as a JSON value where they are JSON; else the string as sent."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def with_object_arguments(messages: list[Message]) -> list[Message]:
    """Calls' arguments as objects, for templates that write them with ``tojson``."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [
                {
                    **call,
                    "function": {
                        **call["function"],
                        "arguments": parsed_arguments(call["function"]["arguments"]),
                    },
                }
                for call in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out
