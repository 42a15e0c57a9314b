"""Authentication in one place: a guarded route's caller is known before its handler runs.

The guard authenticates the request's credentials and puts the caller on
the request's record (:mod:`vergeai.api.record`), where the handler, the
limits' headers, the access log and the usage record read it. Routes left
unguarded (/health) stay open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from vergeai.api.record import record_of
from vergeai.auth import Caller
from vergeai.errors import AuthenticationError, VergeError
from vergeai.service import Service

Handler = Callable[[Request], Awaitable[Response]]


def bearer(request: Request) -> str | None:
    """OpenAI's credentials: the Authorization header."""
    return request.headers.get("authorization")


def guarded(
    handler: Handler,
    credentials: Callable[[Request], str | None] = bearer,
    render: Callable[[VergeError], Response] | None = None,
    open_when: Callable[[Request], bool] | None = None,
) -> Handler:
    """``handler`` behind authentication. ``render``: the error's shape, when the API is
    not OpenAI's; ``open_when``: the route is open to anyone while this holds."""

    @wraps(handler)
    async def guard(request: Request) -> Response:
        if open_when is None or not open_when(request):
            try:
                authenticate(request, credentials(request))
            except VergeError as err:
                if render is None:
                    raise
                return render(err)
        return await handler(request)

    return guard


def authenticate(request: Request, authorization: str | None) -> Caller:
    """The caller of a request, noted on its record; why not, if it is refused (never the
    token: the record keeps the user's and the key's names)."""
    service: Service = request.app.state.service
    record = record_of(request)
    try:
        caller = service.authenticate(authorization)
    except AuthenticationError as exc:
        record.refused = exc.reason
        if exc.key is not None:
            record.refused_key = f"{exc.user}/{exc.key}"
        raise
    record.caller = caller
    return caller
