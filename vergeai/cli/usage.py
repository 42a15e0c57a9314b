"""vergeai usage: token and request totals from the usage record, as a table, JSON or CSV."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

import typer

from vergeai.cli.common import JsonOption, StateDirOption, failures, print_rows, store_for
from vergeai.state.ledger import Filter, Ledger

COLUMNS = ["requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens",
           "total_tokens"]  # fmt: skip


class By(StrEnum):
    day = "day"
    user = "user"
    key = "key"
    assistant = "assistant"


def parse_when(value: str | None, option: str, end: bool = False) -> datetime | None:
    """YYYY-MM-DD or YYYY-MM-DDTHH:MM, local time; a bare --until date counts all that day."""
    if value is None:
        return None
    for fmt, day in (("%Y-%m-%d", True), ("%Y-%m-%dT%H:%M", False)):
        try:
            local = datetime.strptime(value, fmt)
        except ValueError:
            continue
        if end and day:
            local += timedelta(days=1)
        return local.astimezone().astimezone(UTC)
    raise typer.BadParameter(f"{value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM", param_hint=option)


def usage(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's requests.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key's (by name).")] = None,
    assistant: Annotated[
        str | None, typer.Option("--assistant", help="Only this assistant's.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From YYYY-MM-DD[THH:MM], local time.")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="To YYYY-MM-DD (that whole day) or YYYY-MM-DDTHH:MM."),
    ] = None,
    by: Annotated[
        By | None, typer.Option("--by", help="One row per day, user, key or assistant.")
    ] = None,
    csv_: Annotated[bool, typer.Option("--csv", help="Comma-separated values.")] = False,
    json_: JsonOption = False,
    state_dir: StateDirOption = None,
) -> None:
    """Requests and tokens from the usage record: totals, or one row per group."""
    where = Filter(user, key, assistant, parse_when(since, "--since"),
                   parse_when(until, "--until", end=True))  # fmt: skip
    if where.since and where.until and where.since >= where.until:
        raise typer.BadParameter("must come after --since", param_hint="--until")
    if csv_ and json_:
        raise typer.BadParameter("give --csv or --json, not both", param_hint="--csv")
    store = store_for(state_dir)
    with failures():
        rows = Ledger(store.root).totals(where, by.value if by else None)
    if by is None and not rows:
        rows = [dict.fromkeys(COLUMNS, 0)]
    columns = ([by.value] if by else []) + COLUMNS
    if csv_:
        writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    print_rows("usage", columns, rows, json_)
