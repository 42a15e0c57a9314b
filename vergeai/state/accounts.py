"""Users and their API keys, with the limits either may set."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vergeai.state.schema import (
    RecordError,
    Setting,
    check_name,
    check_settings,
    load_record,
    now,
    setting,
    to_table,
)

ROLES = ("admin", "user")
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
        check_settings(self)
        _check_assistants(self.assistants)
        return self

    def may_use(self, assistant: str) -> bool:
        return "*" in self.assistants or assistant in self.assistants

    @classmethod
    def from_toml(cls, name: str, data: dict[str, Any]) -> User:
        return load_record(cls, data, name=name)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        data = to_table(self)
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
        check_settings(self)
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
        return load_record(cls, data)  # type: ignore[no-any-return]

    def to_toml(self) -> dict[str, Any]:
        return to_table(self)
