"""CLI gaps found by the CLI tests: global --state-dir, user edit, duplicate names, key names."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import cli_ok, run_cli
from typer.testing import CliRunner

from vergeai.cli import app


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def users(state: Path) -> dict[str, dict[str, object]]:
    return {u["name"]: u for u in json.loads(cli_ok(state, "user", "list", "--json"))}


def test_state_dir_before_the_command(tmp_path: Path) -> None:
    state, other = tmp_path / "state", tmp_path / "other"
    code, _, err = invoke("--state-dir", str(state), "user", "create", "alice")
    assert code == 0, err
    assert "alice" in users(state)
    # given both ways, the one after the command wins
    code, _, err = invoke("--state-dir", str(state), "user", "create", "bob",
                          "--state-dir", str(other))  # fmt: skip
    assert code == 0, err
    assert set(users(other)) == {"bob"} and set(users(state)) == {"alice"}
    # the next command does not inherit the previous one's --state-dir
    code, out, _ = invoke("--state-dir", str(other), "user", "list", "--json")
    assert [u["name"] for u in json.loads(out)] == ["bob"]


def test_user_edit_changes_role_and_assistants(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "alice", "--force", "--assistants", "a,b")
    cli_ok(state, "user", "edit", "alice", "--role", "admin")
    assert users(state)["alice"]["role"] == "admin"
    assert users(state)["alice"]["assistants"] == ["a", "b"]
    cli_ok(state, "user", "edit", "alice", "--assistants", "*")
    assert users(state)["alice"]["assistants"] == ["*"]
    before = (state / "users.toml").read_bytes()
    for bad in (["--role", "root"], ["--assistants", "a b"], []):
        code, _, _ = run_cli(state, "user", "edit", "alice", *bad)
        assert code == 2, bad
    code, _, err = run_cli(state, "user", "edit", "nobody", "--role", "user")
    assert code == 1 and "no user named 'nobody'" in err
    assert (state / "users.toml").read_bytes() == before


def test_an_assistant_named_twice_is_stored_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "alice", "--force", "--assistants", "a,a,b, a")
    assert users(state)["alice"]["assistants"] == ["a", "b"]
    cli_ok(state, "user", "edit", "alice", "--force", "--assistants", "b,b")
    assert users(state)["alice"]["assistants"] == ["b"]


def test_a_revoked_keys_name_can_be_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "alice")
    first = cli_ok(state, "key", "create", "--user", "alice", "--name", "laptop").strip()
    code, _, err = run_cli(state, "key", "create", "--user", "alice", "--name", "laptop")
    assert code == 1 and "already has a key named 'laptop'" in err
    cli_ok(state, "key", "revoke", "laptop")
    second = cli_ok(state, "key", "create", "--user", "alice", "--name", "laptop").strip()
    assert second != first
    keys = json.loads(cli_ok(state, "key", "list", "--json"))
    assert sorted(k["status"] for k in keys if k["name"] == "laptop") == ["active", "revoked"]
    cli_ok(state, "key", "revoke", "laptop")  # the live one
    code, _, err = run_cli(state, "key", "revoke", "laptop")
    assert code == 1 and "already revoked" in err
