"""vergeai key …"""

from __future__ import annotations

import dataclasses
import inspect
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

import vergeai.cli.settings as settings
from vergeai.auth import display_prefix, hash_token, new_token
from vergeai.cli.common import (
    JsonOption,
    StateDirOption,
    fail,
    failures,
    print_rows,
    say,
    store_for,
)
from vergeai.cli.user import FORCE, check_assistants_exist, parse_assistants
from vergeai.limits import effective_limits, limits_text
from vergeai.state.accounts import LIMITS, ApiKey
from vergeai.state.schema import check_name, now
from vergeai.state.store import State
from vergeai.state.usage import KeyUsage

app = typer.Typer(help="Manage API keys. A token is shown once, at creation.", no_args_is_help=True)

MAX_DESCRIPTION = 1000
NameOption = Annotated[str, typer.Option("--name", help="A name for the key, unique per user.")]


def parse_expires(value: str) -> datetime | None:
    """never, YYYY-MM-DD (00:00 local time) or YYYY-MM-DDTHH:MM (local time)."""
    if value == "never":
        return None
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M"):
        try:
            local = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return local.astimezone().astimezone(UTC)
    raise typer.BadParameter(
        f"{value!r}: use never, YYYY-MM-DD or YYYY-MM-DDTHH:MM", param_hint="--expires"
    )


UserOption = Annotated[str, typer.Option("--user", help="The user this key belongs to.")]
DescriptionOption = Annotated[str | None, typer.Option(help="What the key is for.")]
ExpiresOption = Annotated[
    str | None, typer.Option(help="never, YYYY-MM-DD or YYYY-MM-DDTHH:MM (local time).")
]


def check_description(description: str | None) -> None:
    if description is None:
        return
    if len(description) > MAX_DESCRIPTION:
        raise typer.BadParameter(
            f"at most {MAX_DESCRIPTION} characters", param_hint="--description"
        )
    if "\x00" in description:
        raise typer.BadParameter("must not contain NUL characters", param_hint="--description")


def _params(first: list[inspect.Parameter], editing: bool) -> list[inspect.Parameter]:
    """The options create and edit share: description, expiry, assistants and limits."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        *first,
        inspect.Parameter("description", keyword, default=None, annotation=DescriptionOption),
        inspect.Parameter("expires", keyword, default=None, annotation=ExpiresOption),
        *settings.options(
            ApiKey,
            editing=editing,
            parsers={"assistants": parse_assistants},
            only=("assistants", *LIMITS),
        ),
        FORCE,
        inspect.Parameter("state_dir", keyword, default=None, annotation=StateDirOption),
    ]


def create(
    user: str,
    name: str,
    description: str | None,
    expires: str | None,
    force: bool,
    state_dir: Path | None,
    **values: Any,
) -> None:
    """Create a key and print its token (only the token) on stdout, once.

    The key may be narrowed below its user (fewer assistants, lower limits);
    it never exceeds it.
    """
    expires = "never" if expires is None else expires
    when = parse_expires(expires)
    check_description(description)
    with failures():
        check_name(name, "--name")
    if when is not None and when <= now():
        fail(f"--expires {expires} is in the past")
    token = new_token()
    with failures(), store_for(state_dir).transaction() as state:
        if user not in state.users:
            fail(f"no user named {user!r}")
        # a revoked key's name is free again; the old key stays listed as revoked
        if any(k.name == name and k.revoked is None for k in state.keys_of(user)):
            fail(f"user {user!r} already has a key named {name!r}")
        key = ApiKey(
            name=name,
            user=user,
            hash=hash_token(token),
            prefix=display_prefix(token),
            description=description or "",
            expires=when,
        )
        settings.apply(key, values)
        check_assistants_exist(values["assistants"], state, force)
        state.keys.append(key.validate())
    typer.echo(token)
    say(
        f"created key {name} for user {user} (expires {expires}). "
        "This is the only time the token is shown."
    )


def edit(
    key_name: str,
    user: str | None,
    description: str | None,
    expires: str | None,
    force: bool,
    state_dir: Path | None,
    **values: Any,
) -> None:
    """Change a key's description, expiry, assistants or limits; applied live."""
    if description is None and expires is None and all(v is None for v in values.values()):
        raise typer.BadParameter("nothing to change: give at least one setting")
    check_description(description)
    when = parse_expires(expires) if expires is not None else None
    if when is not None and when <= now():
        fail(f"--expires {expires} is in the past")
    with failures(), store_for(state_dir).transaction() as state:
        key = live_key(state, key_name, user)
        check_assistants_exist(values["assistants"], state, force)
        changed = dataclasses.replace(key)
        settings.apply(changed, values)
        if description is not None:
            changed.description = description
        if expires is not None:
            changed.expires = when
        state.keys[state.keys.index(key)] = changed.validate()
    say(f"updated key {key_name} of user {key.user}")


KeyNameArg = Annotated[str, typer.Argument(help="The key's name.")]
KeyUserOption = Annotated[
    str | None, typer.Option("--user", help="The key's user, when the name is not unique.")
]
_positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
_keyword = inspect.Parameter.KEYWORD_ONLY
app.command("create")(
    settings.command(
        _params(
            [
                inspect.Parameter("user", _keyword, annotation=UserOption),
                inspect.Parameter("name", _keyword, annotation=NameOption),
            ],
            editing=False,
        ),
        create,
    )
)
app.command("edit")(
    settings.command(
        _params(
            [
                inspect.Parameter("key_name", _positional, annotation=KeyNameArg),
                inspect.Parameter("user", _keyword, default=None, annotation=KeyUserOption),
            ],
            editing=True,
        ),
        edit,
    )
)


@app.command("list")
def list_keys(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's keys.")] = None,
    json_: JsonOption = False,
    state_dir: StateDirOption = None,
) -> None:
    """List keys (never their tokens)."""
    store = store_for(state_dir)
    with failures():
        state = store.load()
        if user is not None and user not in state.users and not state.keys_of(user):
            fail(f"no user named {user!r}")
        last_used = KeyUsage(store.root).read()
    at = now()
    rows: list[dict[str, Any]] = []
    for k in state.keys:
        if user is not None and k.user != user:
            continue
        owner = state.users.get(k.user)
        rows.append(
            {
                "name": k.name,
                "user": k.user,
                "prefix": k.prefix,
                "description": k.description,
                "assistants": k.assistants,
                "limits": k.limits(),
                "user_limits": owner.limits() if owner else {},
                "effective_limits": effective_limits(owner, k) if owner else k.limits(),
                "created": k.created,
                "expires": k.expires,
                "last_used": last_used.get(k.hash[:16]),
                "status": k.status(at),
            }
        )
    if not json_:  # both in one column: the key's own, then its user's
        for r in rows:
            own = [limits_text(r["limits"])] if r["limits"] else []
            user_limits = [f"user: {limits_text(r['user_limits'])}"] if r["user_limits"] else []
            r["limits"] = "; ".join(own + user_limits) or "-"
    columns = ["name", "user", "prefix", "assistants", "limits", "expires", "last_used", "status"]
    print_rows("API keys", columns, rows, json_)


def live_key(state: State, key_name: str, user: str | None) -> ApiKey:
    """The one unrevoked key of that name (of that user, when given), or exit 1 saying why."""
    matches = [k for k in state.keys if k.name == key_name and (user is None or k.user == user)]
    if not matches:
        fail(f"no key named {key_name!r}" + (f" for user {user!r}" if user else ""))
    live = [k for k in matches if k.revoked is None]
    if not live:
        fail(f"key {key_name!r} of user {matches[0].user!r} is already revoked")
    if len(live) > 1:
        users = ", ".join(sorted(k.user for k in live))
        fail(f"several users have a key named {key_name!r} ({users}); pass --user")
    return live[0]


@app.command("revoke")
def revoke(
    key_name: KeyNameArg, user: KeyUserOption = None, state_dir: StateDirOption = None
) -> None:
    """Revoke a key: it is refused from its next request on."""
    with failures(), store_for(state_dir).transaction() as state:
        key = live_key(state, key_name, user)
        key.revoked = now()
    say(f"revoked key {key_name} of user {key.user}")
