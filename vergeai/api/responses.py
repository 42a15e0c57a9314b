"""OpenAI's Responses API over the chat path: POST /v1/responses, GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

``input`` (a string or a list of items: messages, function_call and
function_call_output) and ``instructions`` become chat messages; the answer
comes back as output items (reasoning, message, function_call), whole or as
the Responses event sequence. ``store`` (default true) keeps the response
and its conversation for its user; ``previous_response_id`` continues that
conversation (the instructions are not carried over, as OpenAI does).
A stored response's input items are listed as the request gave them, each
with an id (``reasoning`` items, which are not sent to the model, are not
kept).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api import dispatch
from vergeai.api.chat import account, read_whole
from vergeai.api.engines import online_engine
from vergeai.api.fields import bad
from vergeai.api.generation import Choice, Done, Generation, Piece
from vergeai.api.http import (
    EventStream,
    authenticated,
    gate,
    read_json,
    unless_disconnected,
)
from vergeai.api.schemas import parse_chat_request
from vergeai.auth import Caller, check_assistant
from vergeai.errors import InvalidRequest, NotFound, Unsupported, VergeError, error_body
from vergeai.service import Service
from vergeai.state.responses import MAX_STORED, Responses, Stored

TEXT_PARTS = ("input_text", "output_text", "text")
REFUSED = ("background", "conversation", "prompt")  # asynchronous runs, stored prompts
PASSED = ("temperature", "top_p", "top_k", "min_p", "seed", "parallel_tool_calls", "stream")

log = logging.getLogger("vergeai.responses")


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


def _store(request: Request) -> Responses:
    store: Responses = request.app.state.responses
    return store


def _caller(request: Request) -> tuple[Service, Caller]:
    service: Service = request.app.state.service
    caller = authenticated(request)
    return service, caller


def _retention(service: Service) -> dict[str, int]:
    return {name: a.history_days for name, a in service.state.assistants.items()}


async def create_response(request: Request) -> Response:
    service, caller = _caller(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name in REFUSED:
        if body.get(name) not in (None, False):
            raise Unsupported(f"'{name}' is not supported (yet) by this server", param=name)
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise bad("store", "must be a boolean")
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise bad("previous_response_id", "must be a response id")
        found = await _found(request, service, caller, previous)
        if found is None:
            raise NotFound(f"no response {previous[:64]!r}", param="previous_response_id")
        history = found.conversation
    if "input" not in body:
        raise bad("input", "is required")
    conversation = history + input_messages(body["input"])
    reply_id = _id("resp")
    given = input_items(body["input"], reply_id)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "must be a string")
    system = [{"role": "system", "content": instructions}] if instructions else []
    req = parse_chat_request(chat_body(body, system + conversation))
    check_assistant(caller, req.model, service.state)
    passage = gate(request, caller)
    online = online_engine(service, req.model)
    gen = await dispatch.start(online, request.app.state.sessions, passage, req, None)
    reply = ResponseReply(reply_id, online.engine.assistant.name, body, previous, store)

    async def keep(done: Done) -> None:
        if store:
            turn = [*conversation, done.choices[0].message()]
            stored = await asyncio.to_thread(
                _store(request).put, caller.user.name, req.model, reply.whole(done), turn, given
            )
            if not stored:
                log.warning("response %s not stored: it and its conversation are over %d "
                            "characters", reply.id, MAX_STORED)  # fmt: skip

    if req.stream:
        return await stream_reply(request, gen, reply, keep)
    done = await read_whole(request, gen)
    if done is None:
        return Response(status_code=499)
    await keep(done)
    return JSONResponse(reply.whole(done))


async def _found(
    request: Request, service: Service, caller: Caller, response_id: str
) -> Stored | None:
    """The caller's stored response and its conversation, if it has one by that id made
    on an assistant its key may use (a key narrowed to others sees none of it)."""
    found = await asyncio.to_thread(
        _store(request).get, caller.user.name, response_id, _retention(service)
    )
    if found is None or not caller.may_use(str(found.response.get("model"))):
        return None
    return found


async def get_response(request: Request) -> Response:
    service, caller = _caller(request)
    response_id = request.path_params["id"]
    found = await _found(request, service, caller, response_id)
    if found is None:
        raise NotFound(f"no response {response_id[:64]!r}")
    return JSONResponse(found.response)


async def list_input_items(request: Request) -> Response:
    service, caller = _caller(request)
    response_id = request.path_params["id"]
    query = request.query_params
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise bad("limit", "must be a whole number from 1 to 100")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad("order", "must be asc or desc")
    if query.get("include"):
        raise Unsupported("'include' is not supported by this server", param="include")
    found = await _found(request, service, caller, response_id)
    if found is None:
        raise NotFound(f"no response {response_id[:64]!r}")
    items = found.input[::-1] if order == "desc" else found.input
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad("after", f"no input item {after[:64]!r} in this response")
        items = items[ids.index(after) + 1 :]
    page = items[: int(limit)]
    return JSONResponse({
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    })  # fmt: skip


async def delete_response(request: Request) -> Response:
    service, caller = _caller(request)
    response_id = request.path_params["id"]
    found = await _found(request, service, caller, response_id)
    if found is None or not await asyncio.to_thread(
        _store(request).delete, caller.user.name, response_id
    ):
        raise NotFound(f"no response {response_id[:64]!r}")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponseReply:
    def __init__(
        self, id: str, name: str, body: dict[str, Any], previous: str | None, store: bool
    ) -> None:
        self.id = id
        self.name = name
        self.created = int(time.time())
        self.body = body
        self.previous = previous
        self.store = store
        self.message_id = _id("msg")
        self.reasoning_id = _id("rs")
        self.call_ids: dict[int, str] = {}  # tool call index -> output item id

    def head(self, status: str) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.name,
            "output": [],
            "error": None,
            "incomplete_details": None,
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "previous_response_id": self.previous,
            "store": self.store,
            "temperature": b.get("temperature"),
            "top_p": b.get("top_p"),
            "text": b.get("text") or {"format": {"type": "text"}},
            "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools", []),
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "metadata": b.get("metadata") or {},
            "usage": None,
        }

    def reasoning_item(self, text: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip

    def message_item(self, text: str, status: str) -> dict[str, Any]:
        """The message; ``incomplete`` when the answer was cut by max_output_tokens."""
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [part]}  # fmt: skip

    def call_item(self, index: int, call_id: str, name: str, arguments: str, status: str) -> Any:
        item_id = self.call_ids.setdefault(index, _id("fc"))
        return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}  # fmt: skip

    def output(self, choice: Choice) -> list[dict[str, Any]]:
        items = []
        if choice.reasoning:
            items.append(self.reasoning_item(choice.reasoning))
        if choice.content.strip() or not (choice.tool_calls or items):
            items.append(self.message_item(choice.content, _status(choice)))
        items += [
            self.call_item(i, c.id, c.name, c.arguments, "completed")
            for i, c in enumerate(choice.tool_calls)
        ]
        return items

    def whole(self, done: Done) -> dict[str, Any]:
        choice = done.choices[0]
        cut = choice.finish_reason == "length"
        return {
            **self.head("incomplete" if cut else "completed"),
            "output": self.output(choice),
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": done.timings.cache_n,
                    # every prompt token not found in the cache was evaluated into it
                    "cache_write_tokens": done.prompt_tokens - done.timings.cache_n,
                },
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
        }


def _status(choice: Choice) -> str:
    return "incomplete" if choice.finish_reason == "length" else "completed"


class Events:
    """The Responses event sequence: output items opened and closed in order, numbered."""

    def __init__(self, reply: ResponseReply) -> None:
        self.reply = reply
        self.n = 0
        self.index = -1  # output_index of the open item
        self.open: str | None = None  # reasoning, message or function_call
        self.text = ""  # the open item's text or arguments so far
        self.call: tuple[int, str, str] | None = None  # the open call's index, id, name

    def event(self, kind: str, **data: Any) -> bytes:
        self.n += 1
        payload = json.dumps({"type": kind, "sequence_number": self.n, **data})
        return f"event: {kind}\ndata: {payload}\n\n".encode()

    def to(self, kind: str, item: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.open, self.text = kind, ""
        out.append(self.event("response.output_item.added", output_index=self.index, item=item))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=self.index, content_index=0, part=part))  # fmt: skip
        return out

    def close(self, status: str = "completed") -> list[bytes]:
        """Close the open item; ``status`` is a message's (incomplete if the answer was cut)."""
        r, i, text = self.reply, self.index, self.text
        if self.open == "reasoning":
            item = r.reasoning_item(text)
            done = [self.event("response.reasoning_text.done", item_id=item["id"],
                               output_index=i, content_index=0, text=text)]  # fmt: skip
        elif self.open == "message":
            item = r.message_item(text, status)
            part = item["content"][0]
            done = [
                self.event("response.output_text.done", item_id=item["id"], output_index=i,
                           content_index=0, text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=i,
                           content_index=0, part=part),
            ]  # fmt: skip
        elif self.open == "function_call" and self.call is not None:
            index, call_id, name = self.call
            item = r.call_item(index, call_id, name, text, "completed")
            done = [self.event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=i, arguments=text)]  # fmt: skip
        else:
            return []
        self.open = None
        return [*done, self.event("response.output_item.done", output_index=i, item=item)]

    def piece(self, piece: Piece) -> list[bytes]:
        r, out = self.reply, []
        if piece.reasoning:
            if self.open != "reasoning":
                out += self.to("reasoning", r.reasoning_item(""))
            self.text += piece.reasoning
            out.append(self.event("response.reasoning_text.delta", item_id=r.reasoning_id,
                                  output_index=self.index, content_index=0,
                                  delta=piece.reasoning))  # fmt: skip
        if piece.content:
            if self.open != "message":
                out += self.to("message", r.message_item("", "in_progress"))
            self.text += piece.content
            out.append(self.event("response.output_text.delta", item_id=r.message_id,
                                  output_index=self.index, content_index=0,
                                  delta=piece.content, logprobs=[]))  # fmt: skip
        for call in piece.calls:
            if call.id is not None and call.name is not None:
                self.call = (call.index, call.id, call.name)
                item = r.call_item(call.index, call.id, call.name, "", "in_progress")
                out += self.to("function_call", item)
            if call.arguments:
                self.text += call.arguments
                out.append(self.event("response.function_call_arguments.delta",
                                      item_id=r.call_ids[call.index], output_index=self.index,
                                      delta=call.arguments))  # fmt: skip
        return out


async def stream_reply(
    request: Request,
    gen: Generation,
    reply: ResponseReply,
    keep: Callable[[Done], Awaitable[None]],
) -> Response:
    """The Responses event sequence; an error after the start is an ``error`` event."""
    events = await unless_disconnected(request, gen.started())
    if events is None:  # it left before the first token: its place is free at once
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        async with gen:
            out = Events(reply)
            yield out.event("response.created", response=reply.head("in_progress"))
            yield out.event("response.in_progress", response=reply.head("in_progress"))
            try:
                async for current in events:
                    if isinstance(current, Piece):
                        for chunk in out.piece(current):
                            yield chunk
                        continue
                    account(request, current)
                    for chunk in out.close(_status(current.choices[0])):
                        yield chunk
                    whole = reply.whole(current)
                    await keep(current)
                    cut = whole["status"] == "incomplete"
                    yield out.event(
                        f"response.{'incomplete' if cut else 'completed'}", response=whole
                    )
            except VergeError as err:
                yield out.event("error", **error_body(err)["error"])

    return EventStream(body(), on_close=gen.close)
