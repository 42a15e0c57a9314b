"""Which engine answers a request: the assistant's, ready for this kind of request, or the error.

An engine is read through its contract (:mod:`vergeai.runtime.engine`)
only. One whose model is loaded here has facts; an upstream's has none.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from vergeai.errors import InvalidRequest, Unavailable
from vergeai.room import NoRoom
from vergeai.runtime.engine import Engine, ModelFacts, WorkerState
from vergeai.service import Service
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord


@dataclass(frozen=True)
class Online:
    """The assistant asked for, the engine ready for its request, and its model's facts,
    read once (so that one request sees one model); facts None: the model is not here
    (an upstream's)."""

    assistant: Assistant
    engine: Engine
    facts: ModelFacts | None


@dataclass(frozen=True)
class Local:
    """The assistant, an engine with its model here, and the facts of that model."""

    assistant: Assistant
    engine: Engine
    facts: ModelFacts

    @property
    def name(self) -> str:
        return self.engine.name


async def online_engine(
    service: Service, name: str, embedding: bool = False, keep_alive: float | None = None
) -> Online:
    """The assistant's engine, ready for this kind of request, or the error to answer.

    A model that does not fit the memory budget yet is waited for, up to the
    server's ``memory_wait``; one that is loading (an on-demand model's first
    request starts it), up to its ``load_timeout``. ``keep_alive``: the
    request's own idle time before its model unloads. A remote assistant's
    replicas are chosen per request (each attempt may find one recovered), so
    only a local engine's state is checked here.
    """
    assistant = service.state.assistants.get(name)
    if assistant is None:  # checked by the caller's authorization; gone since
        raise Unavailable(f"assistant {name!r} is not defined", retry_after=2)
    spec = service.state.model_of(assistant)
    kind = spec is not None and spec.embedding  # an upstream's assistant is a chat one
    if (spec is not None or assistant.remote) and kind != embedding:
        what = "an embedding" if kind else "a chat"
        use = "POST /v1/embeddings" if kind else "a chat or completion endpoint"
        raise InvalidRequest(
            f"assistant {name!r} is {what} assistant; call it with {use}", param="model"
        )
    if not assistant.online:
        raise Unavailable(
            f"assistant {name!r} is offline; an admin can bring it online with "
            f"'vergeai assistant online {name}'"
        )
    engine = await _room(service, assistant, keep_alive)
    if engine is None:
        raise Unavailable(_missing(name, assistant.model, spec))
    if assistant.remote:
        return Online(assistant, engine, None)
    await _loaded(engine, name, service.pool.load_timeout)
    _check_state(engine, name)
    facts = engine.facts
    if facts is None:  # its thread ended since: the pool replaces it
        raise Unavailable(f"assistant {name!r} is restarting; try again shortly", retry_after=2)
    return Online(assistant, engine, facts)


def _missing(name: str, model: str, spec: ModelRecord | None) -> str:
    if spec is None:
        return f"assistant {name!r} runs model {model!r}, which is not defined"
    if spec.load == "offline":
        return (
            f"assistant {name!r} runs model {model!r}, which is offline; an admin can load it "
            f"with 'vergeai model edit {model} --load on-demand'"
        )
    return f"assistant {name!r} is offline: its model {model!r} is not loaded"


async def _room(service: Service, assistant: Assistant, keep_alive: float | None) -> Engine | None:
    """The assistant's engine, once its model fits the memory budget (NoRoom after
    ``memory_wait`` seconds)."""
    pool = service.pool
    deadline = time.monotonic() + pool.room.wait
    while True:
        try:
            return pool.engine_for(assistant, keep_alive)
        except NoRoom as exc:
            if time.monotonic() >= deadline:
                raise NoRoom(
                    f"{exc.message}; waited {pool.room.wait:g} s for one to become idle",
                    exc.freeing,
                ) from None
            await asyncio.sleep(0.05 if exc.freeing else 0.25)


async def _loaded(engine: Engine, name: str, timeout: float) -> None:
    """Wait while the engine loads its model, up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while engine.state == WorkerState.LOADING:
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"assistant {name!r} is still loading its model after {timeout:g} s; "
                "try again shortly",
                retry_after=5,
            )
        await asyncio.sleep(delay)
        delay = min(0.1, delay * 2)


def _check_state(engine: Engine, name: str) -> None:
    state = engine.state
    if state == WorkerState.RESTARTING:
        raise Unavailable(f"assistant {name!r} is restarting; try again shortly", retry_after=2)
    if state == WorkerState.DEGRADED:
        raise Unavailable(f"assistant {name!r} is not answering: {engine.problem}", retry_after=5)
    if state != WorkerState.ONLINE:
        raise Unavailable(f"assistant {name!r} failed to load its model: {engine.problem}")


async def local_engine(
    service: Service,
    name: str,
    endpoint: str,
    embedding: bool = False,
    keep_alive: float | None = None,
) -> Local:
    """:func:`online_engine` for endpoints that need the model here, not an upstream's."""
    online = await online_engine(service, name, embedding, keep_alive)
    if online.facts is None:
        raise InvalidRequest(
            f"assistant {name!r} is served by upstream servers, which get chat requests only; "
            f"{endpoint} needs an assistant on a local model",
            param="model",
        )
    return Local(online.assistant, online.engine, online.facts)
