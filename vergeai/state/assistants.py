"""Assistants: the names clients call, on a GGUF model here or on upstream servers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from vergeai.state.schema import (
    RecordError,
    check_name,
    check_settings,
    default_of,
    load_record,
    now,
    setting,
    to_table,
)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
MAX_UPSTREAMS = 32


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


@dataclass
class Assistant:
    name: str
    model: str = setting(
        "",
        help="The model it runs (vergeai model list), or a GGUF file's path: a model is made "
        "for the file with the load settings given, or an alike one reused.",
        metavar="MODEL",
    )
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
    ctx: int = setting(
        4096,
        lo=16,
        hi=10_000_000,
        help="Context size in tokens: per slot of the model it makes or changes, or what an "
        "upstream's model has.",
    )
    online: bool = setting(True, help="Load the model when serving.", off="offline")
    created: datetime = field(default_factory=now)

    REMOTE_ONLY = (
        "upstream", "upstream_model", "upstream_key_env", "health_interval", "upstream_timeout",
        "ctx",
    )  # fmt: skip
    LOCAL_ONLY = ("model",)
    # a remote assistant's are all load settings: a change rebuilds its replicas and client
    LOAD_SETTINGS = REMOTE_ONLY

    @property
    def remote(self) -> bool:
        """Served by upstream servers, not by a model loaded here."""
        return bool(self.upstream)

    @property
    def unused(self) -> tuple[str, ...]:
        """The settings of the other kind (local or remote), left out of tables."""
        return self.LOCAL_ONLY if self.remote else self.REMOTE_ONLY

    def load_key(self) -> tuple[Any, ...]:
        """What, when changed, needs a remote assistant's replicas to be rebuilt."""
        return tuple(getattr(self, name) for name in self.LOAD_SETTINGS)

    def validate(self) -> Assistant:
        check_name(self.name)
        check_settings(self)
        if self.remote:
            self._check_remote()
        elif not self.model:
            raise RecordError(
                "model", "must name a model or a GGUF file (or give upstream servers)"
            )
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

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> Assistant:
        return load_record(cls, data, name=name)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        """The table, with only the settings of its kind (local or remote)."""
        data = to_table(self)
        del data["name"]
        return {k: v for k, v in data.items() if k not in self.unused}
