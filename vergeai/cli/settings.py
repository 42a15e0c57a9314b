"""CLI options made from a record's field table, so that create and edit share one declaration.

Each field with a :class:`~vergeai.state.schema.Setting` becomes an option
(``top_p`` → ``--top-p``, booleans a ``--flag/--off-flag`` pair) with the
field's help, choices and range; a value out of range is a usage error
(exit 2). On ``edit``, an optional setting takes ``none`` to clear it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from vergeai.cli.common import fail
from vergeai.state.schema import (
    KINDS,
    RecordError,
    Setting,
    default_of,
    kind_of,
    ordered_fields,
    setting_of,
)

UNSET = "none"


class Unset:
    """The value of an option given as ``none``: back to the field's default."""

    def __repr__(self) -> str:
        return UNSET


CLEAR = Unset()


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser(name: str, kind: type, meta: Setting, clearable: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if clearable and text == UNSET:
            return CLEAR
        value = kind(text)  # a ValueError is click's "not a valid ..." usage error
        try:
            meta.check(name, value)
        except RecordError as exc:
            raise typer.BadParameter(str(exc).split(": ", 1)[1]) from None
        return value

    parse.__name__ = kind.__name__  # click names the expected type after the parser
    return parse


def _help(meta: Setting, clearable: bool) -> str:
    extra = []
    if meta.choices:
        extra.append(", ".join(meta.choices))
    elif span := meta.span():
        extra.append(span)
    if clearable:
        extra.append(f"'{UNSET}' clears it")
    if not extra:
        return meta.help
    return f"{meta.help.rstrip('.')} ({'; '.join(extra)})."


def options(
    record: type,
    editing: bool,
    parsers: dict[str, Callable[[str], Any]] | None = None,
    only: tuple[str, ...] | None = None,
) -> list[inspect.Parameter]:
    """One keyword parameter per setting of ``record`` (or those named), each defaulting to None."""
    params = []
    for f in ordered_fields(record):
        meta = setting_of(f)
        if meta is None or (only is not None and f.name not in only):
            continue
        base, optional = kind_of(f)
        clearable = editing and optional
        if base == "bool":
            annotation: Any = Annotated[
                bool | None, typer.Option(f"{flag_of(f.name)}/--{meta.off}", help=meta.help)
            ]
        else:
            kind = KINDS.get(base, str)  # other kinds (lists) come with their own parser
            parse = (parsers or {}).get(f.name) or _parser(f.name, kind, meta, clearable)
            metavar = meta.metavar or {"int": "N", "float": "F"}.get(base, "TEXT")
            option = typer.Option(
                flag_of(f.name),
                help=_help(meta, clearable),
                metavar=metavar,
                parser=parse,
                show_default=False,
            )
            annotation = Annotated[Any, option]
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )
    return params


def command(params: list[inspect.Parameter], body: Callable[..., None]) -> Callable[..., None]:
    """A function Typer can read: ``params`` as its signature, calling ``body`` with them."""

    def run(**kwargs: Any) -> None:
        body(**kwargs)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    run.__doc__ = body.__doc__
    run.__name__ = body.__name__
    return run


def apply(record: Any, values: dict[str, Any]) -> None:
    """Set every given value on ``record``; CLEAR puts the field's default back."""
    defaults = {f.name: default_of(f) for f in dataclasses.fields(record)}
    for name, value in values.items():
        if value is CLEAR:
            setattr(record, name, defaults[name])
        elif value is not None:
            setattr(record, name, value)


def edit_in(table: dict[str, Any], what: str, name: str, values: dict[str, Any]) -> None:
    """Change the given settings of ``table[name]``, validated; nothing given is exit 2."""
    if all(v is None for v in values.values()):
        raise typer.BadParameter("nothing to change: give at least one setting")
    record = table.get(name)
    if record is None:
        fail(f"no {what} named {name!r}")
    changed = dataclasses.replace(record)
    apply(changed, values)
    table[name] = changed.validate()
