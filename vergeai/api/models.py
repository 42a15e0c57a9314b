"""GET /v1/models and GET /v1/models/{name}."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from vergeai.api.record import caller_of
from vergeai.auth import check_assistant
from vergeai.service import Service
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord


def model_entry(service: Service, assistant: Assistant) -> dict[str, Any]:
    """OpenAI's model object, with what clients look for: kind, context, llama-server's meta."""
    engine = service.pool.engine_of(assistant)
    facts = engine.facts if engine is not None else None
    spec = service.state.model_of(assistant)
    entry: dict[str, Any] = {
        "id": assistant.name,
        "object": "model",
        "created": int(assistant.created.timestamp()),
        "owned_by": "vergeai",
        "model": service.state.display_model(assistant),
        "status": service.pool.state_of(assistant),
        "kind": "embedding" if spec is not None and spec.embedding else "chat",
        "context_length": facts.n_ctx if facts is not None else _ctx(assistant, spec),
    }
    if facts is not None:
        model = facts.model
        entry["meta"] = {
            "n_ctx_train": model.n_ctx_train,
            "n_params": model.n_params,
            "size": model.size_bytes,
            "n_vocab": model.n_vocab,
            "n_embd": model.n_embd,
        }
    return entry


def _ctx(assistant: Assistant, spec: ModelRecord | None) -> int:
    if spec is None:
        return assistant.ctx  # an upstream's
    return spec.ctx


async def list_models(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    caller = caller_of(request)
    data = [
        model_entry(service, a)
        for name, a in sorted(service.state.assistants.items())
        if caller.may_use(name)
    ]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    caller = caller_of(request)
    name = request.path_params["name"]
    check_assistant(caller, name, service.state)
    return JSONResponse(model_entry(service, service.state.assistants[name]))
