"""vergeai user …"""

from __future__ import annotations

import inspect
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

import vergeai.cli.settings as settings
from vergeai.cli.common import (
    JsonOption,
    StateDirOption,
    YesOption,
    confirm,
    fail,
    failures,
    print_rows,
    say,
    store_for,
)
from vergeai.limits import limits_text
from vergeai.state.accounts import User
from vergeai.state.history import History
from vergeai.state.ledger import Ledger
from vergeai.state.responses import Responses
from vergeai.state.schema import check_name, now
from vergeai.state.store import State

app = typer.Typer(help="Manage users: who may call which assistants.", no_args_is_help=True)


def parse_assistants(value: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise typer.BadParameter("give assistant names separated by commas, or '*'")
    for name in names:
        if name != "*":
            try:
                check_name(name)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
    return ["*"] if "*" in names else names


def check_assistants_exist(names: list[str] | None, state: State, force: bool) -> None:
    """A mistyped name would give nothing and say nothing: refuse it unless --force."""
    unknown = [n for n in names or [] if n != "*" and n not in state.assistants]
    if unknown and not force:
        known = ", ".join(sorted(state.assistants)) or "none yet"
        fail(
            f"no assistant named {', '.join(map(repr, unknown))} (there are: {known}); "
            "give --force to allow a name before its assistant is created"
        )


NameArg = Annotated[str, typer.Argument(help="User name.")]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Allow --assistants names not created yet.")
]
FORCE = inspect.Parameter(
    "force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ForceOption
)


def _params(editing: bool) -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=NameArg),
        *settings.options(User, editing=editing, parsers={"assistants": parse_assistants}),
        FORCE,
        inspect.Parameter("state_dir", keyword, default=None, annotation=StateDirOption),
    ]


def create(name: str, force: bool, state_dir: Path | None, **values: Any) -> None:
    """Create a user."""
    with failures():
        user = User(name=check_name(name))
        settings.apply(user, values)
        user.validate()
        with store_for(state_dir).transaction() as state:
            if name in state.users:
                fail(f"user {name!r} already exists")
            check_assistants_exist(values["assistants"], state, force)
            state.users[name] = user
    say(f"created user {name} (role {user.role}, assistants {','.join(user.assistants)})")


def edit(name: str, force: bool, state_dir: Path | None, **values: Any) -> None:
    """Change a user's role, assistants or limits; a running server applies it live."""
    with failures(), store_for(state_dir).transaction() as state:
        settings.edit_in(state.users, "user", name, values)
        check_assistants_exist(values["assistants"], state, force)
    say(f"updated user {name}")


app.command("create")(settings.command(_params(editing=False), create))
app.command("edit")(settings.command(_params(editing=True), edit))


@app.command("list")
def list_users(json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """List users."""
    with failures():
        state = store_for(state_dir).load()
    rows = [
        {
            "name": u.name,
            "role": u.role,
            "enabled": u.enabled,
            "assistants": u.assistants,
            "limits": u.limits() if json_ else limits_text(u.limits()),
            "keys": sum(1 for k in state.keys_of(u.name) if k.status() == "active"),
            "created": u.created,
        }
        for u in sorted(state.users.values(), key=lambda u: u.name)
    ]
    columns = ["name", "role", "enabled", "assistants", "limits", "keys", "created"]
    print_rows("users", columns, rows, json_)


def _set_enabled(name: str, enabled: bool, state_dir: StateDirOption) -> None:
    with failures(), store_for(state_dir).transaction() as state:
        user = state.users.get(name)
        if user is None:
            fail(f"no user named {name!r}")
        user.enabled = enabled
    say(f"user {name} {'enabled' if enabled else 'disabled'}")


@app.command("disable")
def disable(name: str, state_dir: StateDirOption = None) -> None:
    """Disable a user: its keys are refused until it is enabled again."""
    _set_enabled(name, False, state_dir)


@app.command("enable")
def enable(name: str, state_dir: StateDirOption = None) -> None:
    """Enable a disabled user."""
    _set_enabled(name, True, state_dir)


class UsageOnDelete(StrEnum):
    ANONYMISE = "anonymise"
    DELETE = "delete"
    KEEP = "keep"


@app.command("delete")
def delete(
    name: str,
    usage: Annotated[
        UsageOnDelete,
        typer.Option(
            help="The user's usage records: anonymise (counted in totals under a name no "
            "user can have), delete, or keep under its name.",
        ),
    ] = UsageOnDelete.ANONYMISE,
    yes: YesOption = False,
    state_dir: StateDirOption = None,
) -> None:
    """Delete a user: revoke its keys, remove its chat history and stored responses.

    A user created later with the same name starts with none of it.
    """
    store = store_for(state_dir)
    with failures():
        if name not in store.load().users:
            fail(f"no user named {name!r}")
    confirm(f"Delete user {name}, revoke its keys and remove its data?", yes)
    with failures(), store.transaction() as state:
        if name not in state.users:
            fail(f"no user named {name!r}")
        del state.users[name]
        revoked = 0
        for key in state.keys_of(name):
            if key.revoked is None:
                key.revoked = now()
                revoked += 1
    with failures():
        sessions = History(store.root).forget_user(name)
        responses = Responses(store.root).forget_user(name)
        records = 0
        if usage != UsageOnDelete.KEEP:
            records = Ledger(store.root).forget_user(name, usage == UsageOnDelete.ANONYMISE)
    done = {UsageOnDelete.ANONYMISE: "anonymised", UsageOnDelete.DELETE: "deleted"}
    said = f"; {done[usage]} {records} usage record(s)" if usage in done else ""
    say(
        f"deleted user {name}; revoked {revoked} key(s); removed {sessions} chat-history "
        f"session(s) and {responses} stored response(s){said}"
    )
