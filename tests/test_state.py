"""The state directory: the Store, its records, and what every command does with a broken file."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import tomllib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer
from helpers import cli_ok, run_cli

from vergeai.cli import app
from vergeai.errors import StateError
from vergeai.state.accounts import ApiKey, User
from vergeai.state.assistants import Assistant
from vergeai.state.models import ModelRecord
from vergeai.state.schema import RecordError, check_name
from vergeai.state.store import ASSISTANTS, FILES, KEYS, MODELS, USERS, Store, default_state_dir
from vergeai.state.usage import KeyUsage

HASH = "ab" * 32


def key(name: str, user: str = "alice", digest: str = HASH) -> ApiKey:
    return ApiKey(name=name, user=user, hash=digest, prefix="vai-abcdef…")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def marks(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each state file: a rewrite (os.replace) changes the inode."""
    out = {}
    for name in FILES:
        st = (root / name).stat()
        out[name] = (st.st_ino, st.st_mtime_ns)
    return out


# Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def fill(store: Store) -> None:
    with store.transaction() as state:
        state.users["alice"] = User(name="alice")
        state.keys.append(key("k1"))
        state.models["gemma"] = ModelRecord(name="gemma", file="/models/gemma.gguf")
        state.assistants["gemma"] = Assistant(name="gemma", model="gemma")


def test_empty_store_loads_empty_and_a_no_op_transaction_writes_nothing(store: Store) -> None:
    state = store.load()
    assert state.users == {} and state.keys == [] and state.assistants == {}
    assert not store.root.exists()  # reading creates nothing
    with store.transaction():
        pass
    assert {p.name for p in store.root.iterdir()} == {".lock"}
    assert store.fingerprint() == (None, None, None, None)


def test_transaction_saves_only_changed_files(store: Store) -> None:
    fill(store)
    before = marks(store.root)
    texts = snapshot(store.root)

    with store.transaction() as state:
        state.users["bob"] = User(name="bob", role="admin")
    after = marks(store.root)
    assert after[USERS] != before[USERS]
    assert after[KEYS] == before[KEYS]
    assert after[ASSISTANTS] == before[ASSISTANTS]
    assert snapshot(store.root)[KEYS] == texts[KEYS]

    with store.transaction() as state:
        state.keys[0].description = "changed"
    again = marks(store.root)
    assert again[KEYS] != after[KEYS]
    assert again[USERS] == after[USERS] and again[ASSISTANTS] == after[ASSISTANTS]

    with store.transaction() as state:
        state.assistants["gemma"].system_prompt = "Be brief."
    last = marks(store.root)
    assert last[ASSISTANTS] != again[ASSISTANTS]
    assert last[USERS] == again[USERS] and last[KEYS] == again[KEYS]
    assert last[MODELS] == again[MODELS]

    with store.transaction() as state:
        state.models["gemma"].ctx = 1024
    models = marks(store.root)
    assert models[MODELS] != last[MODELS]
    assert models[ASSISTANTS] == last[ASSISTANTS]
    last = models

    with store.transaction() as state:  # reading, or setting a value to what it is
        state.users["bob"].role = "admin"
        assert len(state.keys) == 1
    assert marks(store.root) == last


def test_transaction_that_raises_writes_nothing(store: Store) -> None:
    fill(store)
    before = snapshot(store.root)
    with pytest.raises(RuntimeError), store.transaction() as state:
        state.users.clear()
        state.keys.clear()
        state.assistants["x"] = Assistant(name="x", model="gemma")
        raise RuntimeError("changed my mind")
    assert snapshot(store.root) == before
    assert set(store.load().users) == {"alice"}


def test_round_trip_of_every_field(store: Store) -> None:
    created = datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    user = User(
        name="Alice.B_c-9", role="admin", enabled=False, assistants=["a", "b.c"], created=created,
        rpm=60, tpm=10**12, max_concurrent=1, daily_tokens=5, monthly_tokens=10**15,
    )  # fmt: skip
    plain = User(name="plain")
    api_key = ApiKey(
        name="ci",
        user="Alice.B_c-9",
        hash="0123456789abcdef" * 4,
        prefix="vai-Xy_z-1…",
        description='multi\nline "quoted" \\ ünïcode [not] = a table',
        created=created,
        expires=datetime(2099, 1, 1, 10, 30, tzinfo=plus_two),
        revoked=datetime(2025, 1, 1, tzinfo=UTC),
        assistants=["b.c"],
        rpm=1, tpm=2, max_concurrent=3, daily_tokens=4, monthly_tokens=5,
    )  # fmt: skip
    bare_key = key("bare")
    assistant = Assistant(
        name="qwen",
        model="qwen3-14b",
        model_name="Qwen3-14B-Q6_K",
        system_prompt='You are helpful.\n\tBe "brief".\n\x01 ✓',
        disable_think=True,
        chat_history=True,
        history_turns=7,
        history_days=3,
        temperature=0.25,
        top_p=0.5,
        max_tokens=512,
        online=False,
        created=created,
    )
    model = ModelRecord(
        name="qwen3-14b",
        file='/models/Qwen3 14B/Q6_K "x".gguf',
        ctx=8192,
        parallel=4,
        threads=8,
        gpu_layers=-1,
        chat_format="chatml",
        embedding=True,
        speculate="off",
        max_queue=0,
        kv_type="q8_0",
        flash_attn="on",
        load="always",
        keep_alive=60.0,
        created=created,
    )
    plain_model = ModelRecord(name="plain", file="/m.gguf")
    remote = Assistant(
        name="vllm",
        upstream=["http://gpu-1:8000/v1", "https://gpu-2.internal"],
        upstream_model="Qwen/Qwen3-14B",
        upstream_key_env="VLLM_API_KEY",
        health_interval=2.5,
        upstream_timeout=30.0,
        ctx=32768,
    )
    defaults = Assistant(name="defaults", model="plain")
    # each field differs from the default record's, so the round trip shows it is kept
    pairs = ((user, plain), (api_key, bare_key), (assistant, defaults), (model, plain_model))
    for record, default in pairs:
        for f in dataclasses.fields(record):
            if f.name not in Assistant.REMOTE_ONLY:
                assert getattr(record, f.name) != getattr(default, f.name), f.name
    for name in Assistant.REMOTE_ONLY:
        assert getattr(remote, name) != getattr(defaults, name), name
    with store.transaction() as state:
        state.users = {u.name: u for u in (user, plain)}
        state.keys = [api_key, bare_key]
        state.assistants = {a.name: a for a in (assistant, defaults, remote)}
        state.models = {m.name: m for m in (model, plain_model)}

    loaded = Store(store.root).load()
    assert loaded.users == {"Alice.B_c-9": user, "plain": plain}
    assert loaded.keys == [api_key, bare_key]
    assert loaded.assistants == {"qwen": assistant, "defaults": defaults, "vllm": remote}
    assert loaded.models == {"qwen3-14b": model, "plain": plain_model}
    assert loaded.keys[0].expires == datetime(2099, 1, 1, 8, 30, tzinfo=UTC)
    assert loaded.keys[1].expires is None and loaded.keys[1].revoked is None
    assert loaded.assistants["defaults"].temperature is None
    assert loaded.keys_of("Alice.B_c-9") == [api_key]

    # human-readable TOML, one table per record
    users_text = (store.root / USERS).read_text()
    assert '[users."Alice.B_c-9"]' in users_text and 'role = "admin"' in users_text
    assert "[[keys]]" in (store.root / KEYS).read_text()
    assert "[assistants.qwen]" in (store.root / ASSISTANTS).read_text()
    assert "[models.qwen3-14b]" in (store.root / MODELS).read_text()
    # None values are left out, not written as strings
    bare = tomllib.loads((store.root / KEYS).read_text())["keys"][1]
    assert "expires" not in bare and "revoked" not in bare


def test_fingerprint_changes_on_write(store: Store) -> None:
    empty = store.fingerprint()
    assert empty == (None, None, None, None)
    fill(store)
    filled = store.fingerprint()
    assert all(m is not None for m in filled)
    assert store.fingerprint() == filled  # stable while nothing changes

    with store.transaction():
        pass
    assert store.fingerprint() == filled

    with store.transaction() as state:
        state.users["alice"].enabled = False
    changed = store.fingerprint()
    assert changed[0] != filled[0]
    assert changed[1:] == filled[1:]

    # a change that keeps the size, right after the last one: the replaced file still shows
    previous = changed
    for name in ("b", "c", "d"):
        with store.transaction() as state:
            state.users["alice"].assistants = [name]
        current = store.fingerprint()
        assert current[0] != previous[0]
        assert current[1:] == previous[1:]
        previous = current


def test_threads_writing_at_once_lose_nothing(store: Store) -> None:
    with store.transaction() as state:
        state.users["alice"] = User(name="alice")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(5):
                with Store(store.root).transaction() as state:
                    state.keys.append(key(f"t{t}-{i}", digest=f"{t:02x}{i:02x}" * 16))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    names = sorted(k.name for k in store.load().keys)
    assert names == sorted(f"t{t}-{i}" for t in range(8) for i in range(5))
    assert {p.name for p in store.root.iterdir()} == {".lock", USERS, KEYS}


def test_modes_and_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "state"
    old = os.umask(0)
    try:
        store = Store(root)
        fill(store)
        KeyUsage(root).write({HASH[:16]: datetime.now(UTC)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    names = {p.name for p in root.iterdir()}
    assert {".lock", USERS, KEYS, ASSISTANTS, "usage.db"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(f".{USERS}")]


def test_failed_write_keeps_the_old_file_and_no_temp_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store)
    before = snapshot(store.root)

    def refuse(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(StateError) as info, store.transaction() as state:
        state.users["bob"] = User(name="bob")
    assert str(store.root / USERS) in info.value.message
    assert "No space left" in info.value.message
    monkeypatch.undo()
    assert snapshot(store.root) == before
    assert {p.name for p in store.root.iterdir()} == {".lock", USERS, KEYS, ASSISTANTS, MODELS}


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from vergeai.state.accounts import User
from vergeai.state.store import Store

os.replace = lambda *args: time.sleep(60)  # stop between writing the temp file and renaming it
with Store(Path(sys.argv[1])).transaction() as state:
    state.users["mallory"] = User(name="mallory")
"""


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "alice")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(state)])
    try:
        deadline = time.monotonic() + 30
        while not list(state.glob(f".{USERS}.*.tmp")):
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.02)
    finally:
        writer.kill()  # kill -9 mid-write
        writer.wait()
    assert list(state.glob(f".{USERS}.*.tmp"))
    cli_ok(state, "user", "create", "bob")
    assert not list(state.glob("*.tmp")) and not list(state.glob(".*.tmp"))
    assert set(Store(state).load().users) == {"alice", "bob"}


def test_an_existing_loose_state_dir_is_tightened_to_0700(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / f".{USERS}.4242.tmp").write_text("half a file")
    os.chmod(state / f".{USERS}.4242.tmp", 0o644)
    cli_ok(state, "user", "create", "alice")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / USERS).stat().st_mode) == 0o600
    assert not (state / f".{USERS}.4242.tmp").exists()


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(StateError):
        Store(path).ensure()
    with pytest.raises(StateError), Store(path).transaction():
        pass
    with pytest.raises(StateError):
        Store(path).load()
    assert path.read_text() == "not a directory"
    for args in (["user", "list"], ["user", "create", "alice"], ["key", "list", "--json"]):
        code, out, err = run_cli(path, *args)
        assert code == 1, (args, err)
        assert str(path) in err and "Traceback" not in err and out == ""


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERGEAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "home"
    monkeypatch.delenv("VERGEAI_HOME")
    assert default_state_dir() == tmp_path / "xdg" / "vergeai"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_state_dir() == tmp_path / "user" / ".local" / "share" / "vergeai"


def test_cli_uses_vergeai_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "VERGEAI_HOME": str(home), "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vergeai", "user", "create", "alice"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "alice" in tomllib.loads((home / USERS).read_text())["users"]


# records


@pytest.mark.parametrize(
    "name", ["abc\n", "a" * 65, "", " a", "a/b", ".a", "é", "a\x00", 5, None, ["a"]]
)
def test_check_name_refuses(name: object) -> None:
    with pytest.raises(RecordError) as info:
        check_name(name, "what")
    assert info.value.field_name == "what"


@pytest.mark.parametrize("name", ["a", "A", "0", "a" * 64, "Qwen3-14B_Q6.K"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


def test_record_validation() -> None:
    with pytest.raises(RecordError, match="role"):
        User(name="a", role="root").validate()
    with pytest.raises(RecordError, match="assistants"):
        User(name="a", assistants=["ok", "not ok"]).validate()
    with pytest.raises(RecordError, match="hash"):
        ApiKey(name="k", user="a", hash="ABCD" * 16, prefix="").validate()
    for field, value in [
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("max_tokens", 0),
        ("model", ""),
    ]:
        assistant = Assistant(name="a", model="m")
        setattr(assistant, field, value)
        with pytest.raises(RecordError) as info:
            assistant.validate()
        assert info.value.field_name == field
    for field, value in [
        ("ctx", 15),
        ("threads", 0),
        ("gpu_layers", -2),
        ("parallel", 65),
        ("max_queue", -1),
        ("file", ""),
        ("kv_type", "q5_1"),
        ("flash_attn", "maybe"),
        ("load", "lazy"),
        ("keep_alive", -1.0),
        ("name", "m.gguf"),
        ("name", "a/b"),
    ]:
        model = ModelRecord(name="m", file="/m.gguf")
        setattr(model, field, value)
        with pytest.raises(RecordError) as info:
            model.validate()
        assert info.value.field_name == field
    with pytest.raises(RecordError, match="needs flash attention") as info:
        ModelRecord(name="m", file="/m.gguf", kv_type="q4_0", flash_attn="off").validate()


def test_from_toml_types() -> None:
    # an integer where a float is expected is fine; a boolean where a number is expected is not
    assert Assistant.from_toml("a", {"model": "m", "temperature": 1}).temperature == 1.0
    with pytest.raises(RecordError, match="ctx"):
        ModelRecord.from_toml("m", {"file": "/m.gguf", "ctx": True})
    with pytest.raises(RecordError, match="temperature"):
        Assistant.from_toml("a", {"model": "m", "temperature": "hot"})
    with pytest.raises(RecordError, match="unknown setting"):
        Assistant.from_toml("a", {"model": "m", "temprature": 0.5})
    with pytest.raises(RecordError, match="enabled"):
        User.from_toml("a", {"enabled": 1})
    with pytest.raises(RecordError, match="rol: unknown"):
        User.from_toml("a", {"rol": "admin"})
    with pytest.raises(RecordError, match="expiry: unknown"):
        ApiKey.from_toml({"name": "k", "user": "a", "hash": HASH, "expiry": "2030-01-01"})
    with pytest.raises(RecordError, match="assistants"):
        User.from_toml("a", {"assistants": [1, 2]})
    with pytest.raises(RecordError, match="expires"):
        ApiKey.from_toml({"name": "k", "user": "a", "hash": HASH, "expires": "soon"})
    naive = ApiKey.from_toml(
        {"name": "k", "user": "a", "hash": HASH, "created": datetime(2024, 1, 1, 12, 0)}
    )
    assert naive.created == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def test_key_status() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert key("a").status(at) == "active"
    assert ApiKey("a", "u", HASH, "", expires=at + timedelta(seconds=1)).status(at) == "active"
    assert ApiKey("a", "u", HASH, "", expires=at).status(at) == "expired"
    assert ApiKey("a", "u", HASH, "", expires=at, revoked=at).status(at) == "revoked"
    assert ApiKey("a", "u", HASH, "", revoked=at).status(at) == "revoked"


# key usage (usage.db)


def test_key_usage_round_trip(tmp_path: Path) -> None:
    usage = KeyUsage(tmp_path)
    assert usage.read() == {}
    assert not (tmp_path / "usage.db").exists()
    first = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    second = datetime(2030, 1, 2, 4, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    usage.write({"a" * 16: first, "b" * 16: first})
    usage.write({"a" * 16: second})
    usage.write({})
    assert KeyUsage(tmp_path).read() == {"a" * 16: second, "b" * 16: first}
    assert stat.S_IMODE((tmp_path / "usage.db").stat().st_mode) == 0o600


def test_corrupt_usage_db_is_an_error_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_ok(state, "user", "create", "alice")
    cli_ok(state, "key", "create", "--user", "alice", "--name", "k")
    db = state / "usage.db"
    db.write_bytes(b"this is not an SQLite database, not at all" * 100)
    with pytest.raises(StateError) as info:
        KeyUsage(state).read()
    assert str(db) in info.value.message
    code, out, err = run_cli(state, "key", "list", "--json")
    assert code == 1 and out == ""
    assert str(db) in err and "Traceback" not in err
    # the key itself can still be revoked: revoking does not need usage.db
    cli_ok(state, "key", "revoke", "k")


# hand-broken state files

USERS_OK = '[users.alice]\nrole = "admin"\n'
KEYS_OK = f'[[keys]]\nname = "k"\nuser = "alice"\nhash = "{HASH}"\nprefix = "vai-abcdef"\n'

BROKEN: list[tuple[str, str | bytes, list[str]]] = [
    (USERS, '[users.alice\nrole = "admin"\n', ["not valid TOML", "line 1"]),
    (USERS, 'users = "alice"\n', ["'users' must be a table"]),
    (USERS, "[users]\nalice = 3\n", ["users.alice", "must be a table"]),
    (USERS, "[users.alice]\nrole = 5\n", ["[users.alice]", "role", "expected str"]),
    (USERS, '[users.alice]\nrole = "root"\n', ["[users.alice]", "role", "'root'"]),
    (USERS, '[users.alice]\nenabled = "yes"\n', ["[users.alice]", "enabled", "expected bool"]),
    (USERS, '[users.alice]\nassistants = "a"\n', ["[users.alice]", "assistants"]),
    (USERS, '[users.alice]\nassistants = ["a b"]\n', ["[users.alice]", "assistants"]),
    (USERS, '[users.alice]\ncreated = "yesterday"\n', ["[users.alice]", "created"]),
    (USERS, '[users."bad name"]\nrole = "user"\n', ["[users.bad name]", "not a valid name"]),
    (USERS, b'[users.alice]\nrole = "\xff\xfe"\n', ["not valid TOML", "UTF-8"]),
    (KEYS, "keys = 3\n", ["'keys' must be an array of tables"]),
    (KEYS, "[keys]\nname = 'k'\n", ["'keys' must be an array of tables"]),
    (KEYS, "keys = [1, 2]\n", ["[keys[0]]", "must be a table"]),
    (KEYS, KEYS_OK.replace(HASH, "nothex"), ["[keys[0]]", "hash"]),
    (KEYS, KEYS_OK + "expires = 'soon'\n", ["[keys[0]]", "expires"]),
    (KEYS, KEYS_OK + "expires = 2030-01-01\n", ["[keys[0]]", "expires"]),
    (KEYS, KEYS_OK + "[[keys]]\nname = 'x'\nuser = 7\n", ["[keys[1]]", "user"]),
    (ASSISTANTS, '[assistants.gemma]\nmodel = "/m.gguf"\nctx = "big"\n', ["gemma", "ctx"]),
    (ASSISTANTS, '[assistants.gemma]\nmodel = "/m.gguf"\nctx = 1\n', ["gemma", "ctx"]),
    (ASSISTANTS, '[assistants.gemma]\nmodel = "/m.gguf"\ntop_p = 0.0\n', ["gemma", "top_p"]),
    (ASSISTANTS, '[assistants.gemma]\nmodel = "/m.gguf"\nonline = 1\n', ["gemma", "online"]),
    (ASSISTANTS, "[assistants.gemma]\nctx = 1024\n", ["[assistants.gemma]", "model"]),
    (
        ASSISTANTS,
        '[assistants.gemma]\nmodel = "/m.gguf"\ntemprature = 0.5\n',
        ["[assistants.gemma]", "temprature", "unknown setting"],
    ),
    (ASSISTANTS, "assistants = []\n", ["'assistants' must be a table"]),
    # a misspelled field or table must not be ignored (and then dropped by the next write)
    (USERS, "[users.alice]\nenabeld = false\n", ["[users.alice]", "enabeld", "unknown"]),
    (KEYS, KEYS_OK + "revokd = 2030-01-01T00:00:00Z\n", ["[keys[0]]", "revokd", "unknown"]),
    (USERS, USERS_OK + '[user.bob]\nrole = "admin"\n', ["'user'", "unknown"]),
    (KEYS, KEYS_OK + "[[key]]\nname = 'x'\n", ["'key'", "unknown"]),
    (ASSISTANTS, "[assistant.gemma]\nmodel = '/m.gguf'\n", ["'assistant'", "unknown"]),
    (ASSISTANTS, "[assistants.gemma\n", ["not valid TOML"]),
]

READ_COMMANDS = [
    ["user", "list"],
    ["user", "list", "--json"],
    ["key", "list"],
    ["key", "list", "--json"],
    ["key", "list", "--user", "alice"],
    ["assistant", "list"],
    ["assistant", "list", "--json"],
    ["assistant", "show", "gemma"],
    ["assistant", "show", "gemma", "--json"],
]


VERGEAI = typer.main.get_command(app)


def main(state: Path, *args: str) -> tuple[int, str, str]:
    """Like helpers.run_cli, but as `vergeai` runs (standalone main) on a Click command built
    once: Typer's test runner rebuilds it on every call, and this matrix makes 600 calls."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            VERGEAI.main([*args, "--state-dir", str(state)], prog_name="vergeai")
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
    assert isinstance(code, int)
    return code, out.getvalue(), err.getvalue()


def write_commands(model: str) -> list[list[str]]:
    return [
        ["user", "create", "zed"],
        ["user", "disable", "alice"],
        ["user", "enable", "alice"],
        ["user", "delete", "alice", "--yes"],
        ["key", "create", "--user", "alice", "--name", "new"],
        ["key", "revoke", "k"],
        ["assistant", "create", "fresh", "--model", model, "--chat-format", "gemma"],
        ["assistant", "edit", "gemma", "--ctx", "1024"],
        ["assistant", "online", "gemma"],
        ["assistant", "offline", "gemma"],
        ["assistant", "delete", "gemma", "--yes"],
    ]


@pytest.fixture(scope="module")
def good_template(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Path:
    state = tmp_path_factory.mktemp("good") / "state"
    cli_ok(state, "user", "create", "alice", "--role", "admin")
    cli_ok(state, "key", "create", "--user", "alice", "--name", "k")
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format", "gemma")
    return state


@pytest.fixture
def good_state(tmp_path: Path, good_template: Path) -> Path:
    """A fresh copy of a state dir made by the CLI: a user, a key, an assistant."""
    state = tmp_path / "state"
    shutil.copytree(good_template, state)
    return state


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    BROKEN,
    ids=[f"{f}:{c!r}"[:60] for f, c, _ in BROKEN],
)
def test_broken_state_file(
    good_state: Path, model_path: str, file: str, content: str | bytes, expected: list[str]
) -> None:
    path = good_state / file
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    before = snapshot(good_state)

    for args in READ_COMMANDS + write_commands(model_path):
        code, out, err = main(good_state, *args)
        where = f"vergeai {' '.join(args)}"
        assert code == 1, f"{where} exited {code}: {out}{err}"
        assert out == "", where
        assert err.startswith("error: "), f"{where}: {err}"
        assert str(path) in err, f"{where}: {err}"
        for word in expected:
            assert word in err, f"{where}: {word!r} not in {err}"
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2, f"{where}: {err}"
    assert snapshot(good_state) == before  # no failing write touched any file


@pytest.mark.parametrize(
    ("file", "content"),
    [
        (USERS, b"\xff\xfe\x00garbage"),
        (KEYS, b"keys = 3\n"),
        (ASSISTANTS, b'[assistants.gemma]\nmodel = "/m.gguf"\nwhat = 1\n'),
    ],
)
def test_broken_state_file_in_a_real_process(good_state: Path, file: str, content: bytes) -> None:
    (good_state / file).write_bytes(content)
    before = snapshot(good_state)
    commands = (["user", "list"], ["key", "revoke", "k"])
    procs = [  # both at once: faster
        subprocess.Popen(
            [sys.executable, "-m", "vergeai", *args, "--state-dir", str(good_state)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        for args in commands
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert str(good_state / file) in err
        assert "Traceback" not in err and out == ""
    assert snapshot(good_state) == before


def test_fixing_the_file_makes_everything_work_again(good_state: Path) -> None:
    path = good_state / USERS
    good = path.read_bytes()
    path.write_text("[users.alice]\nrole = 5\n")
    assert run_cli(good_state, "user", "list")[0] == 1
    path.write_bytes(good)
    cli_ok(good_state, "user", "create", "zed")
    data = tomllib.loads(path.read_text())
    assert set(data["users"]) == {"alice", "zed"}


def test_hand_edited_valid_files_are_read(good_state: Path) -> None:
    """What a person might write by hand: minimal tables, comments, local date-times."""
    (good_state / USERS).write_text(
        "# people\n[users.alice]\nrole = 'admin'\n\n[users.bob]\nassistants = ['gemma']\n"
    )
    data = tomllib.loads((good_state / KEYS).read_text())
    data["keys"][0]["expires"] = datetime(2099, 6, 1, 12, 0)  # a local date-time
    (good_state / KEYS).write_text(tomli_w.dumps(data))
    state = Store(good_state).load()
    assert state.users["bob"].role == "user" and state.users["bob"].assistants == ["gemma"]
    assert state.users["bob"].enabled is True
    assert state.keys[0].expires is not None and state.keys[0].status() == "active"
    cli_ok(good_state, "user", "disable", "bob")
    assert Store(good_state).load().users["bob"].enabled is False
