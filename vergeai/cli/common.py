"""What every CLI command shares: the state-dir option, output, errors, exit codes.

Exit codes: 0 ok, 1 failure, 2 usage error (Typer's own), 3 daemon not running.
Data goes to stdout, talk to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from vergeai.errors import VergeError
from vergeai.state.schema import RecordError
from vergeai.state.store import Store, default_state_dir

out = Console(highlight=False, soft_wrap=True)
PIPED_WIDTH = 100_000  # wider than any row: nothing folds when stdout is not a terminal
err = Console(stderr=True, highlight=False, soft_wrap=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory [default: $VERGEAI_HOME, else $XDG_DATA_HOME/vergeai].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


class _Given:
    """--state-dir given before the command (the root callback sets it on every run)."""

    state_dir: Path | None = None


given = _Given()


def store_for(state_dir: Path | None) -> Store:
    """The command's --state-dir, else the one given before the command, else the default."""
    if state_dir is None:
        state_dir = given.state_dir
    return Store(state_dir if state_dir is not None else default_state_dir())


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def say(message: str) -> None:
    err.print(message, markup=False)


@contextmanager
def failures() -> Iterator[None]:
    """Turn our errors into a message on stderr and exit code 1."""
    try:
        yield
    except VergeError as exc:
        fail(exc.message)
    except RecordError as exc:
        fail(str(exc))


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    try:
        ok = typer.confirm(question, default=False, err=True)
    except typer.Abort:  # no answer (end of input): end the prompt's line
        err.print()
        ok = False
    if not ok:
        fail("aborted (pass --yes to skip this question)")


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def print_rows(title: str, columns: list[str], rows: list[dict[str, Any]], json_: bool) -> None:
    """A listing: every field as JSON for scripts, or the chosen columns as a table."""
    if json_:
        print_json(rows)
    else:
        print_table(title, columns, ([r.get(c) for c in columns] for r in rows))


def new_table(title: str, show_header: bool = True, piped_title: bool = True) -> Table:
    """A boxed table on a terminal; piped, plain columns that ``grep`` and ``awk`` read a
    line at a time (no box; a listing also drops its title, leaving header and rows)."""
    if out.is_terminal:
        return Table(title=title, title_justify="left", show_header=show_header)
    return Table(
        title=title if piped_title else None,
        title_justify="left",
        box=None,
        show_header=show_header,
        pad_edge=False,
    )


def show(renderable: RenderableType) -> None:
    """Print to stdout; piped, never folded or wrapped at a width, whatever the terminal."""
    console = out if out.is_terminal else Console(highlight=False, width=PIPED_WIDTH)
    console.print(renderable)


def print_table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    table = new_table(title, piped_title=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    show(table)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
