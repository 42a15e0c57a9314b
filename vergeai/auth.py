"""API tokens: generation, hashing, and the check behind every request.

Tokens carry 256 random bits, so a plain SHA-256 is a safe stored form and
lets a request find its key by hash in one dictionary lookup; the final
comparison is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from vergeai.errors import AuthenticationError, ModelNotFound, PermissionDenied
from vergeai.state.accounts import ApiKey, User
from vergeai.state.schema import now
from vergeai.state.store import State

TOKEN_PREFIX = "vai-"
MAX_TOKEN_LENGTH = 256


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 6] + "…"


@dataclass(frozen=True)
class Caller:
    user: User
    key: ApiKey

    def may_use(self, assistant: str) -> bool:
        """A key may be narrowed to some of its user's assistants, never widened."""
        return self.user.may_use(assistant) and self.key.may_use(assistant)


class KeyIndex:
    """A snapshot of keys and users, indexed by token hash."""

    def __init__(self, state: State) -> None:
        self._users = state.users
        self._by_hash = {k.hash: k for k in state.keys}

    def authenticate(self, authorization: str | None) -> Caller:
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationError("no-token" if not authorization else "not-bearer")
        digest = hash_token(token)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.hash, digest):
            raise AuthenticationError("unknown")
        user = self._users.get(key.user)
        status = key.status(now())
        if user is None:
            raise AuthenticationError("user-removed", key.user, key.name)
        if not user.enabled:
            raise AuthenticationError("user-disabled", key.user, key.name)
        if status != "active":
            raise AuthenticationError(status, key.user, key.name)
        return Caller(user=user, key=key)


def _bearer(header: str | None) -> str | None:
    if not header or len(header) > MAX_TOKEN_LENGTH + 16:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def check_assistant(caller: Caller, name: str, state: State) -> None:
    """404 for a name nobody has, 403 for one this caller may not use."""
    if name not in state.assistants:
        allowed = sorted(a for a in state.assistants if caller.may_use(a))
        shown = repr(name) if len(name) <= 64 else repr(name[:64]) + "…"
        raise ModelNotFound(
            f"Model Not Found: no assistant named {shown}. "
            f"Available: {', '.join(allowed) if allowed else 'none'}",
            param="model",
        )
    if not caller.user.may_use(name):
        raise PermissionDenied(
            f"user {caller.user.name!r} may not use assistant {name!r}", param="model"
        )
    if not caller.key.may_use(name):
        raise PermissionDenied(
            f"key {caller.key.name!r} may not use assistant {name!r}", param="model"
        )
