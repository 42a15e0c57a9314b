"""Tools in a chat request: ``tools``, ``tool_choice``, legacy ``functions``; their grammar.

``tool_choice`` ``"required"`` or a named function constrains the whole
answer to calls whose arguments match the tools' JSON schemas; ``"auto"``
constrains a call from the moment the model starts one (a lazy grammar);
``"none"`` renders no tools. Schema keywords the grammar engine cannot hold
(``uniqueItems``, ``not``, ...) are left out of a tool's grammar rather than
refused: the call still has the right names, types and required properties,
and agents' tool schemas are rarely ours to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vergeai.api.structured import check_schema
from vergeai.errors import InvalidRequest, Unsupported
from vergeai.runtime.constraint import GrammarSpec, json_schema_text
from vergeai.runtime.toolformats import ToolFormat

NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
MAX_TOOLS = 128
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
LEGACY_ID = "call00000"  # 9 alphanumerics, as Mistral's templates want


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how the answer may use them."""

    tools: list[dict[str, Any]]  # OpenAI's shape, as the chat template receives them
    choice: str  # "auto", "required" or the name of the one function to call
    parallel: bool  # several calls in one answer
    legacy: bool  # asked with functions/function_call: answered as message.function_call

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def grammar(
        self, fmt: ToolFormat, answer: dict[str, Any] | None = None, lazy: bool = False
    ) -> GrammarSpec:
        """The calls this request allows, written in the template's format.

        With an ``answer`` schema (response_format) and a choice of answering,
        the output is either calls or an answer held to that schema. ``lazy``:
        the grammar applies from where the model starts a call.
        """
        functions = [t["function"] for t in self.tools]
        if self.forced and self.choice != "required":
            functions = [f for f in functions if f["name"] == self.choice]
        defs: dict[str, Any] = {}
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    fmt.args_key: _placed(f.get("parameters") or NO_PARAMETERS, f"p{i}", defs),
                },
                "required": ["name", fmt.args_key],
            }
            for i, f in enumerate(functions)
        ]
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if defs:
            call = {**call, "$defs": defs}
        check_schema(call, "tools")
        # agents' tool schemas are rarely theirs to change: keywords the engine
        # cannot enforce are left out of the grammar (lenient), not refused
        rules = f"call: %json {json_schema_text(call, lenient=True)}"
        named = self.forced and self.choice != "required"  # one call, as OpenAI and vLLM decode it
        parallel = self.parallel and fmt.parallel and not named
        if answer is not None and not self.forced:
            answer_rule = f"answer: %json {json_schema_text(answer)}"
            lark = f"start: calls | answer\n{fmt.lark('call', parallel, 'calls')}\n{answer_rule}"
        else:
            lark = fmt.lark("call", parallel)
        triggers = (fmt.trigger(),) if lazy else ()
        return GrammarSpec("lark", f"{lark}\n{rules}", "tools", triggers, fmt.markers)


def _placed(parameters: dict[str, Any], name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters as they sit inside the call schema.

    A ``$ref`` is resolved against the root of the schema it is in, and a
    function's parameters (with their ``$defs``/``definitions``, as pydantic
    writes any nested model) are not the call schema's root: such parameters
    move to the call's ``$defs`` under ``name`` and their local refs follow.
    """
    if not _refers(parameters):
        return parameters
    defs[name] = _rebased(parameters, f"#/$defs/{name}")
    return {"$ref": f"#/$defs/{name}"}


def _refers(value: Any) -> bool:
    if isinstance(value, dict):
        return any((k == "$ref" and isinstance(v, str)) or _refers(v) for k, v in value.items())
    return isinstance(value, list) and any(_refers(v) for v in value)


def _rebased(value: Any, base: str) -> Any:
    if isinstance(value, dict):
        return {
            k: base + v[1:]
            if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/"))
            else _rebased(v, base)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rebased(v, base) for v in value]
    return value


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {message}", param=param)


def _function(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "must be an object with a 'name'")
    name = value.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _bad(f"{where}.name", "must be 1-64 letters, digits and _ . : -")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.description", "must be a string")
    parameters = value.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad(f"{where}.parameters", "must be a JSON schema object")
    return value


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "must be an array of tools")
    if len(value) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools")
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object with 'type' and 'function'")
        if tool.get("type", "function") != "function":
            raise Unsupported(
                f"'{where}.type': only function tools are supported (got {tool.get('type')!r})",
                param=where,
            )
        function = _function(tool.get("function"), f"{where}.function")
        if function["name"] in names:
            raise _bad(where, f"a second tool named {function['name']!r}")
        names.add(function["name"])
        tools.append({"type": "function", "function": function})
    return tools


def _choice(value: Any, param: str, names: list[str], legacy: bool) -> str:
    if value is None:
        return "auto"
    if value in ("none", "auto", "required") and not (legacy and value == "required"):
        return str(value)
    function = value.get("function") if isinstance(value, dict) and not legacy else value
    if isinstance(value, dict) and not legacy and value.get("type") != "function":
        raise _bad(param, "must be none, auto, required or {'type': 'function', ...}")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        shape = "{'name': ...}" if legacy else "{'type': 'function', 'function': {'name': ...}}"
        raise _bad(param, f"must be none, auto{'' if legacy else ', required'} or {shape}")
    if name not in names:
        raise _bad(param, f"names {name[:64]!r}, which is not among the tools")
    return name


def parse_tools(body: dict[str, Any]) -> ToolUse | None:
    """The request's tools, or None when it offers none or asks not to use them."""
    legacy = body.get("functions") is not None
    if legacy and body.get("tools") is not None:
        raise _bad("functions", "give tools or functions, not both")
    if legacy:
        functions = body["functions"]
        if not isinstance(functions, list):
            raise _bad("functions", "must be an array of functions")
        tools = _tools([{"type": "function", "function": f} for f in functions])
        param = "function_call"
    else:
        tools = _tools(body.get("tools"))
        param = "tool_choice"
    names = [t["function"]["name"] for t in tools]
    choice = _choice(body.get(param), param, names, legacy)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "must be a boolean")
    if choice == "required" and not tools:
        raise _bad(param, "'required' needs tools")
    if choice == "none" or not tools:
        return None
    return ToolUse(tools, choice, parallel and not legacy, legacy)


def tool_calls_of(message: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """An assistant message's calls (tool_calls, or legacy function_call) in OpenAI's shape."""
    calls, legacy = message.get("tool_calls"), message.get("function_call")
    if calls is None and legacy is None:
        return None
    if calls is None:  # a legacy call: its id is the one a legacy function message answers
        return [
            {
                "id": LEGACY_ID,
                "type": "function",
                "function": _called(legacy, f"{where}.function_call"),
            }
        ]
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls", "must be an array of tool calls")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise _bad(at, "must be an object with 'id' and 'function'")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
            raise _bad(f"{at}.id", "must be a string of 1-256 characters")
        function = _called(call.get("function"), f"{at}.function")
        out.append({"id": call_id, "type": "function", "function": function})
    return out


def _called(function: Any, where: str) -> dict[str, str]:
    if not isinstance(function, dict):
        raise _bad(where, "must be an object with 'name' and 'arguments'")
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "must be a string")
    if not isinstance(arguments, str):
        raise _bad(f"{where}.arguments", "must be a string of JSON")
    return {"name": name, "arguments": arguments}
