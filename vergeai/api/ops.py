"""Operational endpoints: /health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from vergeai.runtime.engine import WorkerState
from vergeai.service import Service


async def health(request: Request) -> JSONResponse:
    """ok when every online assistant can serve; degraded (naming the rest) otherwise.

    200 while at least one assistant serves, 503 when none can: "loading" while models
    are still loading, "offline" when no assistant is meant to be online (a load balancer
    must not send work to a server with nothing to answer it).
    """
    service: Service = request.app.state.service
    assistants = {
        name: service.pool.state_of(a) for name, a in sorted(service.state.assistants.items())
    }
    states = {n: assistants[n] for n, a in service.state.assistants.items() if a.online}
    # an on-demand model not loaded now serves: its first request loads it
    able = (WorkerState.ONLINE, WorkerState.UNLOADED)
    serving = [n for n, s in states.items() if s in able]
    failed = sorted(n for n, s in states.items() if s not in (*able, WorkerState.LOADING))
    loading = any(s == WorkerState.LOADING for s in states.values())
    if not states:
        status = "offline"
    elif len(serving) == len(states):
        status = "ok"
    elif loading and not failed:
        status = "loading"
    else:
        status = "degraded"
    code = 200 if serving else 503
    body: dict[str, object] = {"status": status, "assistants": assistants}
    if failed:
        records = service.state.assistants
        body["failed"] = {n: service.pool.error(records[n]) for n in failed}
    headers = {"Retry-After": "5"} if code == 503 else None
    return JSONResponse(body, status_code=code, headers=headers)
