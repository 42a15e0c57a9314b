"""vergeai key …"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

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
from vergeai.state.records import ApiKey, check_name, now
from vergeai.state.usage import KeyUsage

app = typer.Typer(help="Manage API keys. A token is shown once, at creation.", no_args_is_help=True)

MAX_DESCRIPTION = 1000


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


@app.command("create")
def create(
    user: Annotated[str, typer.Option("--user", help="The user this key belongs to.")],
    name: Annotated[str, typer.Option("--name", help="A name for the key, unique per user.")],
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
    expires: Annotated[
        str, typer.Option(help="never, YYYY-MM-DD or YYYY-MM-DDTHH:MM (local time).")
    ] = "never",
    state_dir: StateDirOption = None,
) -> None:
    """Create a key and print its token (only the token) on stdout, once."""
    when = parse_expires(expires)
    if len(description) > MAX_DESCRIPTION:
        raise typer.BadParameter(
            f"at most {MAX_DESCRIPTION} characters", param_hint="--description"
        )
    if "\x00" in description:
        raise typer.BadParameter("must not contain NUL characters", param_hint="--description")
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
            description=description,
            expires=when,
        ).validate()
        state.keys.append(key)
    typer.echo(token)
    say(
        f"created key {name} for user {user} (expires {expires}). "
        "This is the only time the token is shown."
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
    rows = [
        {
            "name": k.name,
            "user": k.user,
            "prefix": k.prefix,
            "description": k.description,
            "created": k.created,
            "expires": k.expires,
            "last_used": last_used.get(k.hash[:16]),
            "status": k.status(at),
        }
        for k in state.keys
        if user is None or k.user == user
    ]
    columns = ["name", "user", "prefix", "created", "expires", "last_used", "status"]
    print_rows("API keys", columns, rows, json_)


@app.command("revoke")
def revoke(
    key_name: Annotated[str, typer.Argument(help="The key's name.")],
    user: Annotated[
        str | None, typer.Option("--user", help="The key's user, when the name is not unique.")
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Revoke a key: it is refused from its next request on."""
    with failures(), store_for(state_dir).transaction() as state:
        matches = [k for k in state.keys if k.name == key_name and (user is None or k.user == user)]
        if not matches:
            fail(f"no key named {key_name!r}" + (f" for user {user!r}" if user else ""))
        live = [k for k in matches if k.revoked is None]
        if not live:
            fail(f"key {key_name!r} of user {matches[0].user!r} is already revoked")
        if len(live) > 1:
            users = ", ".join(sorted(k.user for k in live))
            fail(f"several users have a key named {key_name!r} ({users}); pass --user")
        key = live[0]
        key.revoked = now()
    say(f"revoked key {key_name} of user {key.user}")
