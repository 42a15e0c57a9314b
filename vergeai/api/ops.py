"""Operational endpoints: /health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from vergeai.service import Service


async def health(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    assistants = {
        name: service.pool.status(a) for name, a in sorted(service.state.assistants.items())
    }
    online = any(s == "online" for s in assistants.values())
    waiting = any(s == "loading" for s in assistants.values())
    status, code = ("ok", 200) if online or not waiting else ("loading", 503)
    return JSONResponse({"status": status, "assistants": assistants}, status_code=code)
