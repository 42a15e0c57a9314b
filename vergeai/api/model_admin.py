"""GET /models, POST /models/load and /models/unload: llama-server's router endpoints, for
admin keys, so that clients of its router (Open WebUI's llama.cpp provider, agents that
read ``status.value``) see and drive vergeai's models unchanged."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from vergeai.api.http import read_json
from vergeai.api.record import caller_of
from vergeai.errors import InvalidRequest, NotFound, PermissionDenied
from vergeai.pool import model_info
from vergeai.service import Service


def _admin(request: Request) -> Service:
    if caller_of(request).user.role != "admin":
        raise PermissionDenied("managing models needs an admin user's key")
    service: Service = request.app.state.service
    return service


def model_status(service: Service, name: str) -> dict[str, Any]:
    spec = service.state.models[name]
    pool = service.pool
    worker = pool.models.get(name)
    info = model_info(pool, name)
    status: dict[str, Any] = {"value": info.pop("state")}
    if worker is not None and worker.problem:
        status["failed"] = True
        status["error"] = worker.problem
    return {
        "id": name,
        "object": "model",
        "owned_by": "vergeai",
        "created": int(spec.created.timestamp()),
        "path": spec.file,
        "load": spec.load,
        "assistants": service.state.assistants_on(name),
        "status": status,
        **info,
    }


async def list_models(request: Request) -> JSONResponse:
    service = _admin(request)
    data = [model_status(service, name) for name in sorted(service.state.models)]
    return JSONResponse({"object": "list", "data": data})


async def _named(request: Request, service: Service) -> str:
    body = await read_json(request)
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequest("give the model's name as 'model'", param="model")
    if name not in service.state.models:
        raise NotFound(f"no model named {name[:100]!r}", param="model")
    return name


async def load_model(request: Request) -> JSONResponse:
    service = _admin(request)
    name = await _named(request, service)
    try:
        service.pool.load(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="model") from None
    return JSONResponse({"success": True, **model_status(service, name)})


async def unload_model(request: Request) -> JSONResponse:
    service = _admin(request)
    name = await _named(request, service)
    service.pool.unload(name)
    return JSONResponse({"success": True, **model_status(service, name)})
