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
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api import dispatch
from vergeai.api.engines import online_engine
from vergeai.api.fields import bad
from vergeai.api.http import (
    gate,
    read_json,
)
from vergeai.api.outputs import Done
from vergeai.api.reading import read_whole
from vergeai.api.record import caller_of
from vergeai.api.response_input import REFUSED, chat_body, input_items, input_messages
from vergeai.api.response_reply import ResponseReply, new_id, stream_reply
from vergeai.api.schemas import parse_chat_request
from vergeai.auth import Caller, check_assistant
from vergeai.errors import InvalidRequest, NotFound, Unsupported
from vergeai.service import Service
from vergeai.state.responses import MAX_STORED, Responses, Stored

log = logging.getLogger("vergeai.responses")


def _store(request: Request) -> Responses:
    store: Responses = request.app.state.responses
    return store


def _caller(request: Request) -> tuple[Service, Caller]:
    service: Service = request.app.state.service
    caller = caller_of(request)
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
    reply_id = new_id("resp")
    given = input_items(body["input"], reply_id)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "must be a string")
    system = [{"role": "system", "content": instructions}] if instructions else []
    req = parse_chat_request(chat_body(body, system + conversation))
    check_assistant(caller, req.model, service.state)
    passage = gate(request, caller)
    online = await online_engine(service, req.model, keep_alive=req.keep_alive)
    gen = await dispatch.start(online, request.app.state.sessions, passage, req, None)
    reply = ResponseReply(reply_id, online.assistant.name, body, previous, store)

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
