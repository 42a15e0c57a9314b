"""POST /v1/embeddings: one pooled, L2-normalised embedding per input, from an embedding assistant.

Each input is one job through the assistant's slots (a few in flight at a
time, so a long list neither floods the queue nor waits behind it whole).
``encoding_format`` ``base64`` is the float32 bytes, as OpenAI's (and the
openai client's default).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api.engines import Local, local_engine
from vergeai.api.fields import FieldSpec, bad, check_fields, field_specs, keep_alive_field
from vergeai.api.http import gate, read_json, unless_disconnected
from vergeai.api.outputs import failure
from vergeai.api.prompting import check_prompt
from vergeai.api.record import caller_of, record_of
from vergeai.auth import check_assistant
from vergeai.errors import InvalidRequest
from vergeai.runtime.engine import Engine
from vergeai.runtime.job import Embedded, Event, Failed, Finished, Job
from vergeai.service import Service

MAX_INPUTS = 2048  # OpenAI's
EMBEDDING_FIELDS: tuple[FieldSpec, ...] = (
    *field_specs("honoured", "model input encoding_format dimensions keep_alive"),
    *field_specs("ignored", "user"),
)
FIELDS_BY_NAME = {f.name: f for f in EMBEDDING_FIELDS}


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_inputs(value: Any) -> list[str | list[int]]:
    """A string, an array of strings, an array of token ids, or an array of those."""
    if isinstance(value, str) or _is_tokens(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad("input", "must be a string, an array of strings or of token ids")
    if len(value) > MAX_INPUTS:
        raise bad("input", f"at most {MAX_INPUTS} inputs in one request")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise bad(f"input[{i}]", "must not be empty")
        elif not _is_tokens(item):
            raise bad(f"input[{i}]", "must be a non-empty string or array of token ids")
    return list(value)


def input_tokens(local: Local, inputs: list[str | list[int]]) -> list[list[int]]:
    model = local.facts.model
    out = []
    for i, item in enumerate(inputs):
        where = "input" if len(inputs) == 1 else f"input[{i}]"
        if isinstance(item, str):
            tokens = model.tokenize(item, add_special=True)
        else:
            if any(not 0 <= t < model.n_vocab for t in item):
                raise bad(where, f"token ids must be from 0 to {model.n_vocab - 1}")
            tokens = item
        check_prompt(local.facts, tokens, where)
        out.append(tokens)
    return out


async def embed_all(engine: Engine, inputs: list[list[int]]) -> list[Any]:
    """Every input's embedding, in order; a few jobs in flight at a time."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    jobs = [
        Job(tokens=t, loop=loop, generate=None, choice=i, queue=queue)
        for i, t in enumerate(inputs)
    ]  # fmt: skip
    window = 2 * (engine.share + 1)  # each slot busy, and its next input waiting
    vectors: list[Any] = [None] * len(jobs)
    submitted = done = 0
    try:
        while done < len(jobs):
            while submitted < len(jobs) and submitted - done < window:
                engine.submit(jobs[submitted])
                submitted += 1
            index, event = await queue.get()
            if isinstance(event, Embedded):
                vectors[index] = event.vector
            elif isinstance(event, Failed):
                raise failure(event)
            elif isinstance(event, Finished):
                done += 1
    finally:
        for job in jobs:
            job.cancel()
    return vectors


async def embeddings(request: Request) -> Response:
    service: Service = request.app.state.service
    caller = caller_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "must name an assistant")
    check_fields(body, FIELDS_BY_NAME)
    if "input" not in body:
        raise bad("input", "is required")
    inputs = parse_inputs(body["input"])
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", "must be float or base64")
    keep_alive = keep_alive_field(body.get("keep_alive"))
    check_assistant(caller, model, service.state)
    passage = gate(request, caller)
    local = await local_engine(service, model, "/v1/embeddings", True, keep_alive)
    n_embd = local.facts.model.n_embd
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != n_embd:
        raise bad(
            "dimensions",
            f"the model's embeddings have {n_embd} dimensions; it cannot give fewer",
        )
    tokens = input_tokens(local, inputs)
    n = sum(len(t) for t in tokens)
    ticket = passage.admit(n)
    try:
        vectors = await unless_disconnected(request, embed_all(local.engine, tokens))
    finally:
        ticket.release()
    if vectors is None:
        return Response(status_code=499)
    record_of(request).usage = {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(v.astype("<f4").tobytes()).decode()
                if encoding == "base64"
                else v.tolist()
            ),
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": n, "total_tokens": n}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})
