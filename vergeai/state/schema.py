"""A record's fields are its schema: settings, loading from TOML, checking.

Each setting's default, range, choices and help text are declared once, in
the field's :func:`setting` metadata, and drive loading, validation and the
CLI options that set it. Loading raises :class:`RecordError` naming the
offending field, so that a hand-edited file gives a message, not a traceback.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


@dataclass(frozen=True)
class Setting:
    """What a field accepts and how the CLI offers it."""

    help: str
    lo: float | None = None
    hi: float | None = None
    above: bool = False  # the value must be above lo, not equal to it
    choices: tuple[str, ...] = ()
    off: str = ""  # a boolean's negative flag ("enable-think" for --disable-think)
    metavar: str = ""

    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise RecordError(name, f"{value!r} is not one of {', '.join(self.choices)}")
        if self.lo is None or self.hi is None:
            return
        if not self.lo <= value <= self.hi or (self.above and value == self.lo):
            raise RecordError(name, f"must be {self.span()}")

    def span(self) -> str:
        """The range in words, as errors, help and the man page say it."""
        if self.lo is None or self.hi is None:
            return ""
        lo, hi = _number(self.lo), _number(self.hi)
        return f"greater than {lo} and at most {hi}" if self.above else f"between {lo} and {hi}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(default: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with its Setting (``default`` may be left out: required)."""
    if default is MISSING:
        return field(metadata={"setting": Setting(**meta)})
    return field(default=default, metadata={"setting": Setting(**meta)})


def setting_of(f: Field[Any]) -> Setting | None:
    meta = f.metadata.get("setting")
    return meta if isinstance(meta, Setting) else None


def default_of(f: Field[Any]) -> Any:
    """The field's default; a required one counts as None when optional, else empty."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if kind_of(f)[1] else ""


def kind_of(f: Field[Any]) -> tuple[str, bool]:
    """The field's base type name and whether it may be None ("float | None")."""
    names = str(f.type).split(" | ")
    return names[0], "None" in names[1:]


class RecordError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def check_name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RecordError(
            what,
            f"{value!r} is not a valid name (1-64 characters: letters, digits, '.', '_', '-',"
            " starting with a letter or digit)",
        )
    return value


def _datetime(value: object, what: str, optional: bool = False) -> datetime | None:
    if value is None and optional:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise RecordError(what, f"{value!r} is not a date-time")


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise RecordError(key, f"expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise RecordError(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _known_only(cls: type, data: dict[str, Any], *implied: str) -> None:
    """A misspelled field is an error, not silently ignored (and dropped by the next write)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)} - set(implied))
    if unknown:
        raise RecordError(unknown[0], "unknown setting")


def ordered_fields(record: Any) -> list[Field[Any]]:
    """The fields as a reader expects them: the inherited limits last."""
    return sorted(fields(record), key=lambda f: f.kw_only is True)


def to_table(record: Any) -> dict[str, Any]:
    """The record as TOML holds it: unset (None) fields left out."""
    data = asdict(record)
    return {f.name: data[f.name] for f in ordered_fields(record) if data[f.name] is not None}


def load_record(cls: Any, data: dict[str, Any], **given: Any) -> Any:
    """A record from its TOML table, field by field as the dataclass declares them."""
    _known_only(cls, data, *given)
    values = dict(given)
    for f in fields(cls):
        if f.name in values:
            continue
        base, optional = kind_of(f)
        default = default_of(f)
        if base == "datetime":
            values[f.name] = _datetime(data.get(f.name, default), f.name, optional)
        elif base == "list[str]":
            items = _typed(data, f.name, list, default)
            if not all(isinstance(item, str) for item in items):
                raise RecordError(f.name, "expected a list of names")
            values[f.name] = items
        else:
            values[f.name] = _typed(data, f.name, KINDS[base], default)
    return cls(**values).validate()


def check_settings(record: Any) -> None:
    for f in fields(record):
        if (meta := setting_of(f)) is not None:
            meta.check(f.name, getattr(record, f.name))
