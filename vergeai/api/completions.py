"""POST /v1/completions: OpenAI's legacy completions, the prompt as the prompt.

No chat template and no system prompt. ``prompt`` is a string, an array of
strings, an array of token ids or an array of those; each prompt gets ``n``
choices (choice ``p * n + j`` is prompt p's j-th), batched through the
assistant's slots. ``suffix`` asks for fill-in-the-middle with the model's
FIM tokens. ``logprobs`` is an integer here (alternatives per token), in the
legacy shape: tokens, token_logprobs, top_logprobs, text_offset.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vergeai.api.engines import Local, local_engine
from vergeai.api.fields import (
    IGNORED_FIELDS,
    REFUSED_SAMPLERS,
    SAMPLING_FIELDS,
    FieldSpec,
    Sampled,
    bad,
    field_specs,
    grammar_spec,
    integer,
    sampled,
)
from vergeai.api.generation import Generation
from vergeai.api.http import (
    EventStream,
    gate,
    read_json,
    sse,
    unless_disconnected,
)
from vergeai.api.local import Launch, launch
from vergeai.api.outputs import Answer, Done, Piece
from vergeai.api.prompting import check_prompt, check_request
from vergeai.api.reading import account, read_whole
from vergeai.api.record import caller_of
from vergeai.auth import check_assistant
from vergeai.errors import InvalidRequest, VergeError, error_body
from vergeai.service import Service

MAX_PROMPTS = 64
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's, for completions

COMPLETION_FIELDS: tuple[FieldSpec, ...] = (
    *field_specs(
        "honoured", f"prompt suffix echo logprobs {SAMPLING_FIELDS} response_format json_schema"
    ),
    *field_specs("ignored", IGNORED_FIELDS),
    FieldSpec("best_of", "refused", (None, 1)),
    *REFUSED_SAMPLERS,
)
FIELDS_BY_NAME = {f.name: f for f in COMPLETION_FIELDS}


@dataclass(kw_only=True)
class CompletionRequest(Sampled):
    prompts: list[str | list[int]] = field(default_factory=list)
    suffix: str | None = None
    echo: bool = False


def _prompts(value: Any) -> list[str | list[int]]:
    def tokens(item: list[Any], where: str) -> list[int]:
        if not item or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise bad(where, "must be a non-empty array of token ids")
        return list(item)

    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad("prompt", "must be a string, an array of strings or of token ids")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [tokens(value, "prompt")]
    if len(value) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts in one request")
    out: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            out.append(tokens(item, f"prompt[{i}]"))
        else:
            raise bad(f"prompt[{i}]", "must be a string or an array of token ids")
    return out


def parse_completion_request(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    common = sampled(body, FIELDS_BY_NAME)
    if "prompt" not in body:
        raise bad("prompt", "is required")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix", "must be a string")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad("echo", "must be a boolean")
    return CompletionRequest(
        **common,
        prompts=_prompts(body["prompt"]),
        suffix=suffix or None,
        echo=echo,
        top_logprobs=integer(body, "logprobs", 0, MAX_LOGPROBS),
    )


def prompt_tokens(local: Local, req: CompletionRequest) -> list[list[int]]:
    """Each prompt's tokens: strings tokenized (with BOS), token arrays as given, FIM framed."""
    model = local.facts.model
    fim = model.fim_tokens() if req.suffix is not None else None
    if req.suffix is not None and fim is None:
        raise InvalidRequest(
            f"'suffix': the model of assistant {local.name!r} has no fill-in-the-middle "
            "tokens in its GGUF metadata",
            param="suffix",
        )
    out = []
    for i, prompt in enumerate(req.prompts):
        where = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, list):
            if any(not 0 <= t < model.n_vocab for t in prompt):
                raise bad(where, f"token ids must be from 0 to {model.n_vocab - 1}")
            tokens = prompt
        elif fim is not None:
            assert req.suffix is not None
            pre, suf, mid = fim
            tokens = [model.bos] if model.add_bos and model.bos >= 0 else []
            tokens += [pre, *model.tokenize(prompt, bos=False), suf]
            tokens += [*model.tokenize(req.suffix, bos=False), mid]
        else:
            tokens = model.tokenize(prompt)
        check_prompt(local.facts, tokens, where)
        out.append(tokens)
    return out


async def completions(request: Request) -> Response:
    service: Service = request.app.state.service
    caller = caller_of(request)
    req = parse_completion_request(await read_json(request))
    check_assistant(caller, req.model, service.state)
    passage = gate(request, caller)
    local = await local_engine(service, req.model, "/v1/completions", keep_alive=req.keep_alive)
    grammar = await check_request(local.facts, req, grammar_spec(req))
    prompts = prompt_tokens(local, req)
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    logprobs = req.top_logprobs is not None

    def answer() -> Answer:
        return Answer(True, False, logprobs, None)

    gen = launch(local, passage, Launch(req, prompts, max_tokens, answer, grammar))
    echoes = [local.facts.model.detokenize(p) if req.echo else "" for p in prompts]
    reply = CompletionReply(local.assistant.name, [e for e in echoes for _ in range(req.n)])
    if req.stream:
        return await stream_reply(request, gen, reply, req.include_usage)
    done = await read_whole(request, gen)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(reply.whole(done))


class CompletionReply:
    def __init__(self, name: str, echoes: list[str]) -> None:
        self.id = "cmpl-" + secrets.token_hex(12)
        self.name = name
        self.created = int(time.time())
        self.echoes = echoes  # per choice: the prompt's text when echo is on
        self.offsets = [len(e) for e in echoes]  # text_offset of each choice's next token

    def base(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.name,
            "system_fingerprint": self.name,
        }

    def whole(self, done: Done) -> dict[str, Any]:
        choices = [
            self.choice(c.index, self.echoes[c.index] + c.content, c.logprobs, c.finish_reason)
            for c in done.choices
        ]
        return {
            **self.base(),
            "choices": choices,
            "usage": done.usage(),
            "timings": done.timings.to_json(),
        }

    def choice(
        self, index: int, text: str, logprobs: list[dict[str, Any]] | None, reason: str | None
    ) -> dict[str, Any]:
        return {
            "text": text,
            "index": index,
            "logprobs": None if logprobs is None else self.legacy_logprobs(index, logprobs),
            "finish_reason": reason,
        }

    def legacy_logprobs(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """OpenAI's completions shape; text_offset counts characters of the returned text."""
        offsets = []
        for e in entries:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {top["token"]: top["logprob"] for top in e["top_logprobs"]} for e in entries
            ],
            "text_offset": offsets,
        }

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self.base(), "choices": [choice]}


async def stream_reply(
    request: Request, gen: Generation, reply: CompletionReply, include_usage: bool
) -> Response:
    """As chat streams: errors before the first token are plain HTTP errors."""
    events = await unless_disconnected(request, gen.started())
    if events is None:  # it left before the first token: its place is free at once
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        async with gen:
            for index, echo in enumerate(reply.echoes):
                if echo:
                    yield sse(reply.chunk(reply.choice(index, echo, None, None)))
            finished: set[int] = set()
            try:
                async for event in events:
                    if isinstance(event, Piece):
                        if event.content or event.logprobs:
                            text, logprobs = event.content, event.logprobs
                            yield sse(reply.chunk(reply.choice(event.index, text, logprobs, None)))
                        if event.finish_reason is not None:
                            finished.add(event.index)
                            end = reply.choice(event.index, "", None, event.finish_reason)
                            yield sse(reply.chunk(end))
                        continue
                    account(request, event)
                    final = next(c for c in event.choices if c.index not in finished)
                    last = reply.chunk(reply.choice(final.index, "", None, final.finish_reason))
                    if include_usage:
                        yield sse(last)
                        last = {**reply.base(), "choices": [], "usage": event.usage()}
                    yield sse({**last, "timings": event.timings.to_json()})
                    yield sse("[DONE]")
            except VergeError as err:
                yield sse(error_body(err))

    return EventStream(body(), on_close=gen.close)
