"""vergeai assistant sessions | clear-history: chat-history sessions in the state dir."""

from __future__ import annotations

from typing import Annotated

import typer

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
from vergeai.state.history import SESSION_ID_RE, History

UserOption = Annotated[str | None, typer.Option("--user", help="Only this user's sessions.")]


def sessions(
    name: Annotated[str, typer.Argument(help="The assistant.")],
    user: UserOption = None,
    json_: JsonOption = False,
    state_dir: StateDirOption = None,
) -> None:
    """List an assistant's chat-history sessions."""
    store = store_for(state_dir)
    with failures():
        state = store.load()
        rows = History(store.root).sessions(name, user)
    if name not in state.assistants and not rows:
        fail(f"no assistant named {name!r}")
    print_rows(f"sessions of {name}", ["id", "user", "turns", "tokens", "last_used"], rows, json_)


def clear_history(
    name: Annotated[str, typer.Argument(help="The assistant.")],
    session: Annotated[str | None, typer.Option("--session", help="Only this session id.")] = None,
    user: UserOption = None,
    yes: YesOption = False,
    state_dir: StateDirOption = None,
) -> None:
    """Delete stored chat history of an assistant (all, one user's, or one session)."""
    if session is not None and not SESSION_ID_RE.match(session):
        raise typer.BadParameter("not a valid session id", param_hint="--session")
    store = store_for(state_dir)
    with failures():
        state = store.load()
        history = History(store.root)
        if name not in state.assistants and not history.sessions(name):
            fail(f"no assistant named {name!r}")
    what = f"session {session!r}" if session else "all sessions"
    whose = f" of user {user!r}" if user else ""
    if session is None:
        confirm(f"Delete {what}{whose} of assistant {name}?", yes)
    with failures():
        count = history.clear(name, user=user, session=session)
    if session is not None and count == 0:
        fail(f"no session {session!r}{whose} on assistant {name!r}")
    say(f"deleted {count} session(s) of assistant {name}")
