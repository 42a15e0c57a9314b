"""Responses API output: the response object whole, or as its event sequence."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from vergeai.api.generation import Generation
from vergeai.api.http import (
    EventStream,
    unless_disconnected,
)
from vergeai.api.outputs import Choice, Done, Piece
from vergeai.api.reading import account
from vergeai.errors import VergeError, error_body


def new_id(prefix: str) -> str:
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
        self.message_id = new_id("msg")
        self.reasoning_id = new_id("rs")
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
        item_id = self.call_ids.setdefault(index, new_id("fc"))
        return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}  # fmt: skip

    def output(self, choice: Choice) -> list[dict[str, Any]]:
        items = []
        if choice.reasoning:
            items.append(self.reasoning_item(choice.reasoning))
        if choice.content.strip() or not (choice.tool_calls or items):
            items.append(self.message_item(choice.content, response_status(choice)))
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


def response_status(choice: Choice) -> str:
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
                    for chunk in out.close(response_status(current.choices[0])):
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
