"""The records kept in the state directory, with their validation.

Each record converts to and from a plain TOML table. ``from_toml`` raises
:class:`RecordError` naming the offending field, so that a hand-edited file
gives a message, not a traceback.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ROLES = ("admin", "user")


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


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@dataclass
class User:
    name: str
    role: str = "user"
    enabled: bool = True
    assistants: list[str] = field(default_factory=lambda: ["*"])
    created: datetime = field(default_factory=now)

    def validate(self) -> User:
        check_name(self.name)
        if self.role not in ROLES:
            raise RecordError("role", f"{self.role!r} is not one of {', '.join(ROLES)}")
        for name in self.assistants:
            if name != "*":
                check_name(name, "assistants")
        return self

    def may_use(self, assistant: str) -> bool:
        return "*" in self.assistants or assistant in self.assistants

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> User:
        _known_only(cls, data, "name")
        assistants = _typed(data, "assistants", list, ["*"])
        if not all(isinstance(a, str) for a in assistants):
            raise RecordError("assistants", "expected a list of names")
        return cls(
            name=name,
            role=_typed(data, "role", str, "user"),
            enabled=_typed(data, "enabled", bool, True),
            assistants=assistants,
            created=_datetime(data.get("created", now()), "created") or now(),
        ).validate()

    def to_toml(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        return data


@dataclass
class ApiKey:
    name: str
    user: str
    hash: str
    prefix: str
    description: str = ""
    created: datetime = field(default_factory=now)
    expires: datetime | None = None
    revoked: datetime | None = None

    def validate(self) -> ApiKey:
        check_name(self.name)
        check_name(self.user, "user")
        if not re.fullmatch(r"[0-9a-f]{64}", self.hash):
            raise RecordError("hash", "expected a 64-digit hex SHA-256")
        return self

    def status(self, at: datetime | None = None) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= (at or now()):
            return "expired"
        return "active"

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> ApiKey:
        _known_only(cls, data)
        return cls(
            name=_typed(data, "name", str, ""),
            user=_typed(data, "user", str, ""),
            hash=_typed(data, "hash", str, ""),
            prefix=_typed(data, "prefix", str, ""),
            description=_typed(data, "description", str, ""),
            created=_datetime(data.get("created", now()), "created") or now(),
            expires=_datetime(data.get("expires"), "expires", optional=True),
            revoked=_datetime(data.get("revoked"), "revoked", optional=True),
        ).validate()

    def to_toml(self) -> dict[str, Any]:
        return _drop_none(asdict(self))


@dataclass
class Assistant:
    name: str
    model: str
    model_name: str = ""
    system_prompt: str = ""
    disable_think: bool = False
    chat_history: bool = False
    history_turns: int = 50
    history_days: int = 30
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    ctx: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    chat_format: str | None = None
    parallel: int = 1
    max_queue: int = 64
    online: bool = True
    created: datetime = field(default_factory=now)

    LOAD_SETTINGS = ("model", "ctx", "threads", "gpu_layers", "chat_format", "parallel")

    @property
    def display_model(self) -> str:
        if self.model_name:
            return self.model_name
        base = self.model.rsplit("/", 1)[-1]
        return base[:-5] if base.lower().endswith(".gguf") else base

    def load_key(self) -> tuple[Any, ...]:
        """What, when changed, needs the model context to be rebuilt."""
        return tuple(getattr(self, name) for name in self.LOAD_SETTINGS)

    def validate(self) -> Assistant:
        check_name(self.name)
        if not self.model:
            raise RecordError("model", "must name a GGUF file")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise RecordError("temperature", "must be between 0 and 2")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise RecordError("top_p", "must be greater than 0 and at most 1")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= 1_000_000:
            raise RecordError("max_tokens", "must be a positive integer")
        if not 16 <= self.ctx <= 10_000_000:
            raise RecordError("ctx", "must be between 16 and 10000000")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise RecordError("threads", "must be between 1 and 1024")
        if not -1 <= self.gpu_layers <= 100_000:
            raise RecordError("gpu_layers", "must be -1 (all) or a count of layers")
        if not 1 <= self.parallel <= 64:
            raise RecordError("parallel", "must be between 1 and 64")
        if not 1 <= self.history_turns <= 10_000:
            raise RecordError("history_turns", "must be between 1 and 10000")
        if not 1 <= self.history_days <= 36_500:
            raise RecordError("history_days", "must be between 1 and 36500")
        if not 0 <= self.max_queue <= 100_000:
            raise RecordError("max_queue", "must be between 0 and 100000")
        return self

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> Assistant:
        _known_only(cls, data, "name")
        return cls(
            name=name,
            model=_typed(data, "model", str, ""),
            model_name=_typed(data, "model_name", str, ""),
            system_prompt=_typed(data, "system_prompt", str, ""),
            disable_think=_typed(data, "disable_think", bool, False),
            chat_history=_typed(data, "chat_history", bool, False),
            history_turns=_typed(data, "history_turns", int, 50),
            history_days=_typed(data, "history_days", int, 30),
            temperature=_typed(data, "temperature", float, None),
            top_p=_typed(data, "top_p", float, None),
            max_tokens=_typed(data, "max_tokens", int, None),
            ctx=_typed(data, "ctx", int, 4096),
            threads=_typed(data, "threads", int, None),
            gpu_layers=_typed(data, "gpu_layers", int, 0),
            chat_format=_typed(data, "chat_format", str, None),
            parallel=_typed(data, "parallel", int, 1),
            max_queue=_typed(data, "max_queue", int, 64),
            online=_typed(data, "online", bool, True),
            created=_datetime(data.get("created", now()), "created") or now(),
        ).validate()

    def to_toml(self) -> dict[str, Any]:
        data = _drop_none(asdict(self))
        del data["name"]
        return data
