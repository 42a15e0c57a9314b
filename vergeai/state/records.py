"""The records kept in the state directory, with their validation.

Each record converts to and from a plain TOML table. ``from_toml`` raises
:class:`RecordError` naming the offending field, so that a hand-edited file
gives a message, not a traceback.

A record's fields are its table: each setting's default, range, choices and
help text are declared once, in the field's :func:`setting` metadata, and
drive loading, validation and the CLI options that set it.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
MAX_UPSTREAMS = 32
ROLES = ("admin", "user")
CHAT_FORMATS = ("gemma", "chatml", "llama-3", "mistral-instruct")
SPECULATION = ("ngram", "off")
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


def _table(record: Any) -> dict[str, Any]:
    """The record as TOML holds it: unset (None) fields left out."""
    data = asdict(record)
    return {f.name: data[f.name] for f in ordered_fields(record) if data[f.name] is not None}


def _load(cls: Any, data: dict[str, Any], **given: Any) -> Any:
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


def _check_settings(record: Any) -> None:
    for f in fields(record):
        if (meta := setting_of(f)) is not None:
            meta.check(f.name, getattr(record, f.name))


LIMITS = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens")


@dataclass(kw_only=True)
class Limited:
    """Limits on a user's or a key's requests; None is no limit (a key's user may set one)."""

    rpm: int | None = setting(None, lo=1, hi=1_000_000, help="Requests per minute.")
    tpm: int | None = setting(
        None, lo=1, hi=10**12, help="Tokens (prompt and completion) per minute."
    )
    max_concurrent: int | None = setting(None, lo=1, hi=100_000, help="Requests at once.")
    daily_tokens: int | None = setting(
        None, lo=1, hi=10**15, help="Tokens per day (UTC), counted from the usage record."
    )
    monthly_tokens: int | None = setting(
        None, lo=1, hi=10**15, help="Tokens per calendar month (UTC)."
    )

    def limits(self) -> dict[str, int]:
        """The limits that are set."""
        return {name: v for name in LIMITS if (v := getattr(self, name)) is not None}


def check_upstream_url(url: object) -> str:
    """An http(s) base URL with a host, no credentials, query or fragment (``/v1`` optional)."""
    if not isinstance(url, str) or len(url) > 2048 or not url.isprintable() or " " in url:
        raise RecordError("upstream", f"{url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RecordError("upstream", f"{url!r}: give an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise RecordError(
            "upstream", f"{parts.hostname}: no credentials in the URL; use upstream_key_env"
        )
    if parts.query or parts.fragment:
        raise RecordError("upstream", f"{url!r}: a base URL has no query or fragment")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise RecordError(
            "upstream", f"{url!r}: the port is not a number from 1 to 65535"
        ) from None
    return url


def _check_assistants(names: list[str]) -> None:
    for name in names:
        if name != "*":
            check_name(name, "assistants")


@dataclass
class User(Limited):
    name: str
    role: str = setting("user", choices=ROLES, help="What the user may do.", metavar="ROLE")
    enabled: bool = True
    assistants: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={
            "setting": Setting(
                help="Assistants this user may call: a,b or '*' for all.", metavar="NAMES"
            )
        },
    )
    created: datetime = field(default_factory=now)

    def validate(self) -> User:
        check_name(self.name)
        _check_settings(self)
        _check_assistants(self.assistants)
        return self

    def may_use(self, assistant: str) -> bool:
        return "*" in self.assistants or assistant in self.assistants

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> User:
        return _load(cls, data, name=name)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        data = _table(self)
        del data["name"]
        return data


@dataclass
class ApiKey(Limited):
    name: str
    user: str
    hash: str
    prefix: str
    description: str = setting("", help="What the key is for.", metavar="TEXT")
    assistants: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={
            "setting": Setting(
                help="Assistants this key may call, of its user's: a,b or '*' for all.",
                metavar="NAMES",
            )
        },
    )
    created: datetime = field(default_factory=now)
    expires: datetime | None = None
    revoked: datetime | None = None

    def validate(self) -> ApiKey:
        check_name(self.name)
        check_name(self.user, "user")
        _check_settings(self)
        if not re.fullmatch(r"[0-9a-f]{64}", self.hash):
            raise RecordError("hash", "expected a 64-digit hex SHA-256")
        _check_assistants(self.assistants)
        return self

    def may_use(self, assistant: str) -> bool:
        return "*" in self.assistants or assistant in self.assistants

    def status(self, at: datetime | None = None) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= (at or now()):
            return "expired"
        return "active"

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> ApiKey:
        return _load(cls, data)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        return _table(self)


@dataclass
class Assistant:
    name: str
    model: str = setting("", help="Path of a GGUF model file.", metavar="FILE.gguf")
    # a remote assistant: OpenAI-compatible servers answer instead of a GGUF loaded here
    upstream: list[str] = field(default_factory=list)  # the CLI's --upstream, repeatable
    upstream_model: str | None = setting(
        None, help="The model id the upstream servers serve.", metavar="ID"
    )
    upstream_key_env: str | None = setting(
        None,
        help="Environment variable (or entry of the state dir's secrets.toml) holding the "
        "upstream's API key.",
        metavar="VAR",
    )
    health_interval: float = setting(
        5.0, lo=0.5, hi=3600, help="Seconds between health checks of each upstream.", metavar="S"
    )
    upstream_timeout: float = setting(
        300.0,
        lo=1,
        hi=86_400,
        help="Seconds an upstream may take to connect or stay silent in an answer.",
        metavar="S",
    )
    model_name: str = setting("", help="Display name of the underlying model.", metavar="DISPLAY")
    system_prompt: str = setting("", help="System prompt put before every chat.", metavar="TEXT")
    disable_think: bool = setting(False, help="Suppress the model's thinking.", off="enable-think")
    chat_history: bool = setting(
        False, help="Remember sessions across calls.", off="no-chat-history"
    )
    history_turns: int = setting(50, lo=1, hi=10_000, help="Turns kept per session.")
    history_days: int = setting(30, lo=1, hi=36_500, help="Idle days until a session expires.")
    temperature: float | None = setting(
        None, lo=0, hi=2, help="Default sampling temperature [0.8].", metavar="F"
    )
    top_p: float | None = setting(
        None, lo=0, hi=1, above=True, help="Default top-p [0.95].", metavar="F"
    )
    max_tokens: int | None = setting(
        None, lo=1, hi=1_000_000, help="Default completion token limit [2048]."
    )
    ctx: int = setting(4096, lo=16, hi=10_000_000, help="Context size in tokens, per slot.")
    threads: int | None = setting(None, lo=1, hi=1024, help="CPU threads [all].")
    gpu_layers: int = setting(0, lo=-1, hi=100_000, help="Layers to offload to a GPU; -1 = all.")
    chat_format: str | None = setting(
        None,
        choices=CHAT_FORMATS,
        help="Chat template for GGUFs without one [the GGUF's own].",
        metavar="NAME",
    )
    parallel: int = setting(1, lo=1, hi=64, help="Requests decoded together.")
    embedding: bool = setting(
        False, help="Serve embeddings (/v1/embeddings) instead of chat.", off="no-embedding"
    )
    max_queue: int = setting(64, lo=0, hi=100_000, help="Requests that may wait; then 503.")
    speculate: str = setting(
        "ngram",
        choices=SPECULATION,
        help="Draft tokens from the prompt and output (n-gram lookup), checked in one step.",
        metavar="MODE",
    )
    online: bool = setting(True, help="Load the model when serving.", off="offline")
    created: datetime = field(default_factory=now)

    REMOTE_ONLY = (
        "upstream", "upstream_model", "upstream_key_env", "health_interval", "upstream_timeout"
    )  # fmt: skip
    LOCAL_ONLY = (
        "model", "threads", "gpu_layers", "chat_format", "parallel", "speculate", "max_queue"
    )  # fmt: skip
    # a remote assistant's are all load settings: a change rebuilds its replicas and client
    LOAD_SETTINGS = (
        "model", "ctx", "threads", "gpu_layers", "chat_format", "parallel", "embedding",
        *REMOTE_ONLY,
    )  # fmt: skip

    @property
    def remote(self) -> bool:
        """Served by upstream servers, not by a model loaded here."""
        return bool(self.upstream)

    @property
    def unused(self) -> tuple[str, ...]:
        """The settings of the other kind (local or remote), left out of tables."""
        return self.LOCAL_ONLY if self.remote else self.REMOTE_ONLY

    @property
    def display_model(self) -> str:
        if self.model_name:
            return self.model_name
        if self.remote:
            return self.upstream_model or ""
        base = self.model.rsplit("/", 1)[-1]
        return base[:-5] if base.lower().endswith(".gguf") else base

    def load_key(self) -> tuple[Any, ...]:
        """What, when changed, needs the model context to be rebuilt."""
        return tuple(getattr(self, name) for name in self.LOAD_SETTINGS)

    def validate(self) -> Assistant:
        check_name(self.name)
        _check_settings(self)
        if self.remote:
            self._check_remote()
        elif not self.model:
            raise RecordError("model", "must name a GGUF file (or give upstream servers)")
        defaults = {f.name: default_of(f) for f in fields(self)}
        for name in self.unused:
            if getattr(self, name) != defaults[name]:
                kind = "a local model" if self.remote else "upstream servers"
                raise RecordError(name, f"is a setting of assistants on {kind}")
        return self

    def _check_remote(self) -> None:
        if self.model:
            raise RecordError(
                "upstream", "an assistant runs a GGUF model or upstream servers, not both"
            )
        if len(self.upstream) > MAX_UPSTREAMS:
            raise RecordError("upstream", f"at most {MAX_UPSTREAMS} servers")
        if len(set(self.upstream)) != len(self.upstream):
            raise RecordError("upstream", "a server is listed twice")
        for url in self.upstream:
            check_upstream_url(url)
        model = self.upstream_model
        if not model or len(model) > 256 or not model.isprintable():
            raise RecordError(
                "upstream_model", "must name the model the upstream serves (1-256 characters)"
            )
        if self.upstream_key_env is not None and not ENV_NAME_RE.match(self.upstream_key_env):
            raise RecordError(
                "upstream_key_env",
                f"{self.upstream_key_env!r} is not an environment variable name "
                "(letters, digits and _, not starting with a digit)",
            )
        if self.embedding:
            raise RecordError("embedding", "upstream servers serve chat assistants only")

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> Assistant:
        return _load(cls, data, name=name)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        """The table, with only the settings of its kind (local or remote)."""
        data = _table(self)
        del data["name"]
        return {k: v for k, v in data.items() if k not in self.unused}
