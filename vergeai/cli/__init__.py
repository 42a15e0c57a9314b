"""The vergeai command: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from vergeai import __version__
from vergeai.cli import assistant, history, key, model, serve, usage, user, workers
from vergeai.cli.common import StateDirOption, given

app = typer.Typer(
    name="vergeai",
    help="Self-hosted, OpenAI-compatible API for local GGUF models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(user.app, name="user")
app.add_typer(key.app, name="key")
assistant.app.command("sessions")(history.sessions)
assistant.app.command("clear-history")(history.clear_history)
app.add_typer(assistant.app, name="assistant")
app.add_typer(model.app, name="model")
app.command("serve")(serve.serve)
app.command("workers")(workers.workers)
app.command("usage")(usage.usage)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    state_dir: StateDirOption = None,
) -> None:
    """Self-hosted, OpenAI-compatible API for local GGUF models.

    --state-dir may come before the command or after it (the latter wins).
    """
    given.state_dir = state_dir


def main() -> None:
    app()
