"""create_app: the Starlette application, with no module-level state."""

from __future__ import annotations

from prometheus_client import disable_created_metrics
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vergeai.api import anthropic, model_admin, responses
from vergeai.api.access import AccessLog
from vergeai.api.chat import chat_completions
from vergeai.api.completions import completions
from vergeai.api.conversation import Sessions
from vergeai.api.embeddings import embeddings
from vergeai.api.guard import Handler, guarded
from vergeai.api.http import error_response
from vergeai.api.metrics import Metrics, metrics
from vergeai.api.models import get_model, list_models
from vergeai.api.ops import health
from vergeai.api.waiting import anthropic_error_event, responses_error_event
from vergeai.api.waiting import streams_while_waiting as waits
from vergeai.errors import InvalidRequest, NotFound, VergeError
from vergeai.service import Service
from vergeai.state.responses import Responses


async def on_verge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VergeError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: VergeError = NotFound(f"Not Found: {request.method} {request.url.path[:200]}")
    else:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return error_response(err)


def anthropic_guarded(handler: Handler) -> Handler:
    """Anthropic's credentials (x-api-key, else Authorization), its error shape."""
    return guarded(handler, anthropic.api_key, anthropic.anthropic_error)


def metrics_open(request: Request) -> bool:
    public: bool = request.app.state.metrics_public
    return public


def create_app(
    service: Service,
    metrics_public: bool = False,
    read_timeout: float = 30.0,
    cache_scope: str = "user",
    store_mb_per_user: int = 256,
) -> Starlette:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    stats = Metrics(service)
    routes = [
        Route("/v1/chat/completions", guarded(waits(chat_completions)), methods=["POST"]),
        Route("/v1/completions", guarded(waits(completions)), methods=["POST"]),
        Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
        Route(
            "/v1/messages",
            anthropic_guarded(
                waits(anthropic.messages, anthropic_error_event, anthropic.anthropic_error)
            ),
            methods=["POST"],
        ),
        Route(
            "/v1/responses",
            guarded(waits(responses.create_response, responses_error_event)),
            methods=["POST"],
        ),
        Route("/v1/responses/{id}", guarded(responses.get_response), methods=["GET"]),
        Route(
            "/v1/responses/{id}/input_items",
            guarded(responses.list_input_items),
            methods=["GET"],
        ),
        Route("/v1/responses/{id}", guarded(responses.delete_response), methods=["DELETE"]),
        Route(
            "/v1/messages/count_tokens",
            anthropic_guarded(anthropic.count_tokens),
            methods=["POST"],
        ),
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(get_model), methods=["GET"]),
        Route("/models", guarded(model_admin.list_models), methods=["GET"]),
        Route("/models/load", guarded(model_admin.load_model), methods=["POST"]),
        Route("/models/unload", guarded(model_admin.unload_model), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", guarded(metrics, open_when=metrics_open), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog, metrics=stats)],
        exception_handlers={VergeError: on_verge_error, HTTPException: on_http_error},
    )
    app.state.service = service
    per_user = store_mb_per_user * 1024 * 1024
    app.state.sessions = Sessions(service.store.root, per_user)
    app.state.responses = Responses(service.store.root, per_user)
    app.state.metrics = stats
    app.state.metrics_public = metrics_public
    app.state.read_timeout = read_timeout
    app.state.cache_scope = cache_scope
    return app
