"""Which engine answers a request: the assistant's, ready for this kind of request, or the error.

An engine is read through its contract (:mod:`vergeai.runtime.engine`)
only. One whose model is loaded here has facts; an upstream's has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from vergeai.errors import InvalidRequest, Unavailable
from vergeai.runtime.engine import Engine, ModelFacts, WorkerState
from vergeai.service import Service


@dataclass(frozen=True)
class Online:
    """An engine ready for a request, and its model's facts, read once (so that one
    request sees one model); facts None: the model is not here (an upstream's)."""

    engine: Engine
    facts: ModelFacts | None


@dataclass(frozen=True)
class Local:
    """An engine with its model here, and the facts of that model."""

    engine: Engine
    facts: ModelFacts

    @property
    def name(self) -> str:
        return self.engine.name


def online_engine(service: Service, name: str, embedding: bool = False) -> Online:
    """The assistant's engine, ready for this kind of request, or the error to answer.

    A remote assistant's replicas are chosen per request (each attempt may
    find one recovered), so only a local engine's state is checked here.
    """
    assistant = service.state.assistants.get(name)
    if assistant is not None and assistant.embedding != embedding:
        what = "an embedding" if assistant.embedding else "a chat"
        use = "POST /v1/embeddings" if assistant.embedding else "a chat or completion endpoint"
        raise InvalidRequest(
            f"assistant {name!r} is {what} assistant; call it with {use}", param="model"
        )
    engine = service.pool.get(name)
    if engine is None:
        raise Unavailable(
            f"assistant {name!r} is offline; an admin can bring it online with "
            f"'vergeai assistant online {name}'"
        )
    if engine.assistant.remote:
        return Online(engine, None)
    _check_state(engine, name)
    facts = engine.facts
    if facts is None:  # its thread ended since: the pool replaces it
        raise Unavailable(f"assistant {name!r} is restarting; try again shortly", retry_after=2)
    return Online(engine, facts)


def _check_state(engine: Engine, name: str) -> None:
    state = engine.state
    if state == WorkerState.LOADING:
        raise Unavailable(
            f"assistant {name!r} is still loading its model; try again shortly", retry_after=5
        )
    if state == WorkerState.RESTARTING:
        raise Unavailable(f"assistant {name!r} is restarting; try again shortly", retry_after=2)
    if state == WorkerState.DEGRADED:
        raise Unavailable(f"assistant {name!r} is not answering: {engine.problem}", retry_after=5)
    if state != WorkerState.ONLINE:
        raise Unavailable(f"assistant {name!r} failed to load its model: {engine.problem}")


def local_engine(service: Service, name: str, endpoint: str, embedding: bool = False) -> Local:
    """:func:`online_engine` for endpoints that need the model here, not an upstream's."""
    online = online_engine(service, name, embedding)
    if online.facts is None:
        raise InvalidRequest(
            f"assistant {name!r} is served by upstream servers, which get chat requests only; "
            f"{endpoint} needs an assistant on a local model",
            param="model",
        )
    return Local(online.engine, online.facts)
