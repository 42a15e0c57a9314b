"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path.

A Messages request is translated into a chat request (system blocks to a
system message, tool_use and tool_result blocks to tool calls and tool
messages, ``thinking`` to enable_thinking, ``tool_choice`` any/tool/none to
required/named/none) and answered from the same generation, in Anthropic's
shapes: content blocks (thinking, text, tool_use), stop reasons, its event
stream and its error object. Keys come as ``x-api-key`` or a Bearer token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api import dispatch
from vergeai.api.conversation import prepare
from vergeai.api.engines import local_engine, online_engine
from vergeai.api.fields import bad
from vergeai.api.generation import Generation
from vergeai.api.http import (
    EventStream,
    gate,
    read_json,
    unless_disconnected,
)
from vergeai.api.outputs import Choice, Done, Piece
from vergeai.api.policy import thinking_for
from vergeai.api.reading import account, read_whole
from vergeai.api.record import caller_of
from vergeai.api.schemas import ChatRequest, parse_chat_request
from vergeai.auth import check_assistant
from vergeai.errors import InvalidRequest, VergeError
from vergeai.service import Service

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def anthropic_error(err: VergeError) -> JSONResponse:
    kind = ERROR_TYPES.get(err.status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": err.message}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _text(blocks: Any, where: str) -> str:
    """A string, or text blocks joined: what Anthropic allows for system and results."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad(where, "must be a string or an array of content blocks")
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else None
            raise bad(f"{where}[{i}]", f"only text blocks are supported here (got {kind!r})")
        if not isinstance(block.get("text"), str):
            raise bad(f"{where}[{i}].text", "must be a string")
        texts.append(block["text"])
    return "\n".join(texts)


def _message(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI chat messages (tool results become tool messages)."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise bad(f"{where}.role", "must be user or assistant")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or an array of content blocks")
    texts, calls, results = [], [], []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning is not sent back to the model
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(at, "a tool_use block needs a string id and name")
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": arguments}})  # fmt: skip
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(f"{at}.tool_use_id", "must name the tool_use it answers")
            result = _text(block.get("content", ""), f"{at}.content")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": result})  # fmt: skip
        elif kind in ("image", "document"):
            raise bad(at, f"the models here take text only; {kind} blocks need a multimodal model")
        else:
            raise bad(at, f"a {role} message cannot hold a {kind!r} block here")
    out: list[dict[str, Any]] = list(results)
    if calls:
        out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
    elif texts or not results:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def _tools(body: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad("tools", "must be an array of tools")
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or "input_schema" not in tool:
            raise bad(f"tools[{i}]", "only client tools with an input_schema are supported")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if "description" in tool:
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    chat["tools"] = converted
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice", "must be {'type': auto, any, tool or none}")
    if choice["type"] == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        chat["tool_choice"] = CHOICES[choice["type"]]
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def to_chat(body: Any, count_only: bool = False) -> ChatRequest:
    """The Messages request as a checked chat request; a 400 names Anthropic's fields."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    chat: dict[str, Any] = {"model": body.get("model")}
    if not count_only:
        tokens = body.get("max_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise bad("max_tokens", "is required: a positive integer")
        chat["max_tokens"] = tokens
    for name in ("stream", "temperature", "top_p", "top_k", "keep_alive"):
        if name in body:
            chat[name] = body[name]
    if "stop_sequences" in body:
        chat["stop"] = body["stop_sequences"]
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty array of messages")
    chat["messages"] = [m for i, message in enumerate(messages)
                        for m in _message(message, f"messages[{i}]")]  # fmt: skip
    if body.get("system"):
        chat["messages"].insert(0, {"role": "system", "content": _text(body["system"], "system")})
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            raise bad("thinking", "must be {'type': 'enabled'} or {'type': 'disabled'}")
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] == "enabled"}
    _tools(body, chat)
    req = parse_chat_request(chat)
    last = req.messages[-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        return req
    # a final assistant message is the answer begun (a prefill): the model goes on from it
    if last["content"] != last["content"].rstrip():
        raise bad(
            f"messages[{len(messages) - 1}].content",
            "the final assistant content cannot end with trailing whitespace",
        )
    if not last["content"]:
        return replace(req, messages=req.messages[:-1])
    return replace(req, continue_final=True)


def api_key(request: Request) -> str | None:
    """Anthropic's credentials: the x-api-key header, else Authorization."""
    key = request.headers.get("x-api-key")
    return f"Bearer {key}" if key is not None else request.headers.get("authorization")


async def messages(request: Request) -> Response:
    try:
        return await _messages(request)
    except VergeError as err:
        return anthropic_error(err)


async def _messages(request: Request) -> Response:
    service: Service = request.app.state.service
    caller = caller_of(request)
    req = to_chat(await read_json(request))
    check_assistant(caller, req.model, service.state)
    passage = gate(request, caller)
    online = await online_engine(service, req.model, keep_alive=req.keep_alive)
    gen = await dispatch.start(online, request.app.state.sessions, passage, req, None)
    reply = MessageReply(online.assistant.name, gen.jobs[0].prompt_tokens)
    if req.stream:
        return await stream_reply(request, gen, reply)
    done = await read_whole(request, gen)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(reply.whole(done))


async def count_tokens(request: Request) -> Response:
    try:
        service: Service = request.app.state.service
        caller = caller_of(request)
        req = to_chat(await read_json(request), count_only=True)
        check_assistant(caller, req.model, service.state)
        passage = gate(request, caller)
        local = await local_engine(service, req.model, "counting tokens")
        assistant = local.assistant
        thinking = thinking_for(req, assistant)
        tools = req.tools.tools if req.tools else None
        # counting is work: it counts against requests per minute and in flight, not tokens
        ticket = passage.admit(0)
        try:
            prepared = await asyncio.to_thread(
                prepare, local.facts, assistant.system_prompt, [], req.messages, thinking, 1,
                False, tools, req.continue_final,
            )  # fmt: skip
        finally:
            ticket.release()
        return JSONResponse({"input_tokens": len(prepared.rendered.tokens)})
    except VergeError as err:
        return anthropic_error(err)


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return {}  # a call cut off by max_tokens


class MessageReply:
    def __init__(self, name: str, input_tokens: int) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.name = name
        self.input_tokens = input_tokens

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.name}

    @staticmethod
    def stop(choice: Choice) -> tuple[str, str | None]:
        if choice.stop_word is not None:
            return "stop_sequence", choice.stop_word
        return STOP_REASONS.get(choice.finish_reason, "end_turn"), None

    def whole(self, done: Done) -> dict[str, Any]:
        choice = done.choices[0]
        content: list[dict[str, Any]] = []
        if choice.reasoning:
            content.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
        if choice.content.strip() or not (choice.tool_calls or content):
            content.append({"type": "text", "text": choice.content})
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c.arguments)}
            for c in choice.tool_calls
        ]
        reason, word = self.stop(choice)
        return {
            **self.head(),
            "content": content,
            "stop_reason": reason,
            "stop_sequence": word,
            "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens},
        }


def event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


class Blocks:
    """The stream's content blocks: one open at a time, opened and closed by kind."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # thinking, text or tool_use

    def to(self, kind: str, start: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.open = kind
        out.append(event("content_block_start", {"index": self.index, "content_block": start}))
        return out

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"index": self.index})]

    def piece(self, piece: Piece) -> list[bytes]:
        out: list[bytes] = []
        if piece.reasoning:
            if self.open != "thinking":
                out += self.to("thinking", {"type": "thinking", "thinking": ""})
            delta = {"type": "thinking_delta", "thinking": piece.reasoning}
            out.append(event("content_block_delta", {"index": self.index, "delta": delta}))
        if piece.content:
            if self.open != "text":
                out += self.to("text", {"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": piece.content}
            out.append(event("content_block_delta", {"index": self.index, "delta": delta}))
        for call in piece.calls:
            if call.id is not None:
                start: dict[str, Any] = {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": {},
                }
                out += self.to("tool_use", start)
            if call.arguments:
                delta = {"type": "input_json_delta", "partial_json": call.arguments}
                out.append(event("content_block_delta", {"index": self.index, "delta": delta}))
        return out


async def stream_reply(request: Request, gen: Generation, reply: MessageReply) -> Response:
    """Anthropic's event sequence; an error after the start is an ``error`` event."""
    events = await unless_disconnected(request, gen.started())
    if events is None:  # it left before the first token: its place is free at once
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        async with gen:
            usage = {"input_tokens": reply.input_tokens, "output_tokens": 0}
            message = {**reply.head(), "content": [], "stop_reason": None,
                       "stop_sequence": None, "usage": usage}  # fmt: skip
            yield event("message_start", {"message": message})
            blocks = Blocks()
            try:
                async for current in events:
                    if isinstance(current, Piece):
                        for chunk in blocks.piece(current):
                            yield chunk
                        continue
                    account(request, current)
                    for chunk in blocks.close():
                        yield chunk
                    reason, word = reply.stop(current.choices[0])
                    delta = {"stop_reason": reason, "stop_sequence": word}
                    out = {"output_tokens": current.completion_tokens}
                    yield event("message_delta", {"delta": delta, "usage": out})
                    yield event("message_stop", {})
            except VergeError as err:
                kind = ERROR_TYPES.get(err.status, "api_error")
                yield event("error", {"error": {"type": kind, "message": err.message}})

    return EventStream(body(), on_close=gen.close)
