"""An upstream's streamed answer, read: its SSE events, each parsed as a JSON chunk."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from vergeai.upstream.failure import Failure, mid_stream_error, refusal
from vergeai.upstream.replicas import Remote, Replica, describe

MAX_EVENT = 16 * 1024 * 1024


async def answer_chunks(
    remote: Remote, replica: Replica, body: dict[str, Any]
) -> AsyncGenerator[Any, None]:
    """The upstream's SSE events, parsed; a :class:`Failure` for whatever goes wrong."""
    url = replica.base + "/v1/chat/completions"
    answered = False
    try:
        async with remote.http().stream("POST", url, json=body, headers=remote.headers()) as r:
            answered = True
            if r.status_code != 200:
                raise await refusal(r)
            done = False
            async for data in _events(r):
                if done:  # read to the end, so that the connection is kept for the next
                    continue
                if data == b"[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise Failure("a malformed event in the answer", eject=False) from None
                if not isinstance(chunk, dict):
                    raise Failure("a malformed event in the answer", eject=False)
                if "error" in chunk:
                    raise mid_stream_error(chunk["error"])
                yield chunk
            if done:
                return
    except httpx.HTTPError as exc:
        stale = not answered and isinstance(exc, httpx.RemoteProtocolError)
        raise Failure(describe(exc), stale=stale) from None
    raise Failure("the answer ended without [DONE]")


async def _events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The data of each SSE ``data:`` line, split from the bytes as they come."""
    pending = b""
    async for part in response.aiter_bytes():
        lines = (pending + part).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_EVENT:
            raise Failure("an event in the answer is over 16 MiB", eject=False)
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
