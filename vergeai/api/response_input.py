"""Responses API input: its items as chat messages, its fields as a chat request body."""

from __future__ import annotations

from typing import Any

from vergeai.api.fields import bad

TEXT_PARTS = ("input_text", "output_text", "text")
REFUSED = ("background", "conversation", "prompt")  # asynchronous runs, stored prompts
PASSED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "parallel_tool_calls",
    "stream",
    "keep_alive",
)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(where, "must be a string or an array of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            if kind in ("input_image", "input_file", "input_audio"):
                raise bad(f"{where}[{i}]", f"the models here take text only ({kind})")
            raise bad(f"{where}[{i}]", "must be a text part")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The request's input as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input", "must be a string or a non-empty array of input items")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "must be an input item object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad(f"{where}.role", "must be user, assistant, system or developer")
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "{}")
            if not all(isinstance(v, str) and v for v in (call_id, name)) or not isinstance(
                arguments, str
            ):
                raise bad(where, "a function_call needs string call_id, name and arguments")
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments}}  # fmt: skip
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"{where}.call_id", "must name the function_call it answers")
            output = _content(item.get("output"), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue  # earlier reasoning is not sent back to the model
        else:
            raise bad(f"{where}.type", f"{kind!r} items are not supported")
    return out


def _parts(content: Any, kind: str) -> list[dict[str, Any]]:
    """A message's content as listed parts of one ``kind`` (input_text or output_text)."""
    texts = [content] if isinstance(content, str) else [part["text"] for part in content]
    extra: dict[str, Any] = {"annotations": []} if kind == "output_text" else {}
    return [{"type": kind, "text": text, **extra} for text in texts]


def input_items(value: Any, response_id: str) -> list[dict[str, Any]]:
    """The request's input (already checked by :func:`input_messages`) as the items
    ``input_items`` lists: each with its type, status and an id (its own if it had one)."""
    given = (
        [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    )
    stem = response_id.removeprefix("resp_")
    items = []
    for n, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue
        if kind == "message":
            text = "output_text" if item["role"] == "assistant" else "input_text"
            out = {
                "type": "message",
                "role": item["role"],
                "content": _parts(item["content"], text),
            }
        elif kind == "function_call":
            out = {"type": kind, "call_id": item["call_id"], "name": item["name"],
                   "arguments": item.get("arguments", "{}")}  # fmt: skip
        else:
            output = item["output"]
            text = output if isinstance(output, str) else "\n".join(p["text"] for p in output)
            out = {"type": kind, "call_id": item["call_id"], "output": text}
        own = item.get("id")
        prefix = {"message": "msg", "function_call": "fc"}.get(kind, "fco")
        out["id"] = own if isinstance(own, str) and own else f"{prefix}_{stem}_{n}"
        items.append({**out, "status": "completed"})
    return items


def chat_body(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request this Responses request asks for."""
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    chat.update((k, body[k]) for k in PASSED if k in body)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "must be an array of tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise bad(f"tools[{i}]", f"only function tools are supported (got {kind!r})")
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            converted.append({"type": "function", "function": function})
        chat["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise bad("text", "must be an object")
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = {"name": fmt.get("name"), "schema": fmt.get("schema", {"type": "object"})}
            chat["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt is not None:
            chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") == "none":
        chat["chat_template_kwargs"] = {"enable_thinking": False}
    return chat
