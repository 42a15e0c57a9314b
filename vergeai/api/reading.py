"""Reading a generation for a reply, as every endpoint does: whole, or accounted as it ends."""

from __future__ import annotations

from starlette.requests import Request

from vergeai.api.generation import Generation
from vergeai.api.http import unless_disconnected
from vergeai.api.outputs import Done
from vergeai.api.record import record_of


def account(request: Request, done: Done) -> None:
    """What the access log and the metrics record of a finished answer."""
    record = record_of(request)
    record.usage = done.usage()
    record.ttft = done.ttft


async def read_whole(request: Request, gen: Generation) -> Done | None:
    """The whole answer, read while watching the client, and accounted; None if it left."""
    async with gen:
        done = await unless_disconnected(request, gen.whole())
    if done is not None:
        account(request, done)
    return done
