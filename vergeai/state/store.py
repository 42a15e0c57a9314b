"""The only code that reads and writes the state directory's TOML files.

Writes are atomic (temp file, fsync, ``os.replace``) and serialized by an
exclusive ``flock`` on ``.lock``, so two CLI calls at once never lose an
update and a crash mid-write never leaves a half-written file. Readers need
no lock: each file is replaced whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from vergeai.errors import StateError
from vergeai.state.accounts import ApiKey, User
from vergeai.state.assistants import Assistant
from vergeai.state.migration import is_v1, migrate
from vergeai.state.models import ModelRecord
from vergeai.state.schema import RecordError

USERS = "users.toml"
KEYS = "keys.toml"
ASSISTANTS = "assistants.toml"
MODELS = "models.toml"
FILES = (USERS, KEYS, ASSISTANTS, MODELS)
V1_BACKUP = "assistants.toml.v1"  # assistants.toml as it was before models were records


def default_state_dir() -> Path:
    if home := os.environ.get("VERGEAI_HOME"):
        return Path(home)
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "vergeai"


@dataclass
class State:
    users: dict[str, User] = field(default_factory=dict)
    keys: list[ApiKey] = field(default_factory=list)
    assistants: dict[str, Assistant] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    migrated: bool = False  # read from the form before model records: the next write updates

    def model_of(self, assistant: Assistant) -> ModelRecord | None:
        """The model a local assistant runs (None: a remote one, or a model not defined)."""
        return None if assistant.remote else self.models.get(assistant.model)

    def assistants_on(self, model: str) -> list[str]:
        """The names of the assistants that run the model, sorted."""
        return sorted(n for n, a in self.assistants.items() if not a.remote and a.model == model)

    def display_model(self, assistant: Assistant) -> str:
        """The model's name as clients see it: the assistant's model_name, else the
        upstream's model id or the GGUF file's name."""
        if assistant.model_name or assistant.remote:
            return assistant.model_name or assistant.upstream_model or ""
        model = self.model_of(assistant)
        return model.display if model is not None else assistant.model

    def keys_of(self, user: str) -> list[ApiKey]:
        return [k for k in self.keys if k.user == user]


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        """Create the state dir (0700), or tighten an existing one to 0700."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise StateError(f"state directory {self.root} is not a directory")
        mode = self.root.stat().st_mode & 0o777
        if mode != 0o700:
            try:
                os.chmod(self.root, 0o700)
            except OSError as exc:
                raise StateError(
                    f"state directory {self.root} has mode {mode:04o} and cannot be "
                    f"tightened to 0700 ({exc.strerror}); fix it with 'chmod 700 {self.root}'"
                ) from exc

    def path(self, name: str) -> Path:
        return self.root / name

    # reading

    def load(self) -> State:
        state = State()
        for name, table in self._read(USERS).get("users", {}).items():
            state.users[name] = _record(
                self.path(USERS), f"users.{name}", User.from_toml, name, table
            )
        keys = self._read(KEYS).get("keys", [])
        if not isinstance(keys, list):
            raise StateError(f"{self.path(KEYS)}: 'keys' must be an array of tables")
        for i, table in enumerate(keys):
            state.keys.append(_record(self.path(KEYS), f"keys[{i}]", ApiKey.from_toml, table))
        for name, table in self._read(MODELS).get("models", {}).items():
            state.models[name] = _record(
                self.path(MODELS), f"models.{name}", ModelRecord.from_toml, name, table
            )
        tables = self._read(ASSISTANTS).get("assistants", {})
        if any(isinstance(t, dict) and is_v1(t) for t in tables.values()):
            tables = self._migrate(tables, state)
        for name, table in tables.items():
            where = f"assistants.{name}"
            state.assistants[name] = _record(
                self.path(ASSISTANTS), where, Assistant.from_toml, name, table
            )
        return state

    def _migrate(self, tables: dict[str, Any], state: State) -> dict[str, Any]:
        try:
            tables = migrate(tables, state.models)
        except RecordError as exc:
            raise StateError(f"{self.path(ASSISTANTS)}: {exc}") from exc
        state.migrated = True
        return tables

    def fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever any state file is replaced; cheap enough to poll."""
        marks: list[Any] = []
        for name in FILES:
            try:
                st = os.stat(self.path(name))
            except FileNotFoundError:
                marks.append(None)
            else:
                marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(marks)

    def _read(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            return {}
        except tomllib.TOMLDecodeError as exc:
            raise StateError(f"{path}: not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise StateError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from exc
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc}") from exc
        table = name.removesuffix(".toml")
        for key, value in data.items():
            if key != table:
                raise StateError(f"{path}: unknown table '{key}' (this file holds '{table}')")
            if key in ("users", "assistants", "models") and not isinstance(value, dict):
                raise StateError(f"{path}: '{key}' must be a table")
            if key in ("users", "assistants", "models"):
                for entry, table in value.items():
                    if not isinstance(table, dict):
                        raise StateError(f"{path}: [{key}.{entry}] must be a table")
        return data

    # writing

    def migrate(self) -> bool:
        """Write a state dir from before model records in the new form, keeping the old
        assistants.toml beside it; whether there was anything to migrate."""
        if not self.load().migrated:
            return False
        with self.transaction():
            pass
        return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """Lock, load, let the caller change the state, then save what changed."""
        self.ensure()
        lock_path = self.path(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_temp_files()
            state = self.load()
            before = _serialize(state)
            yield state
            after = _serialize(state)
            if state.migrated:
                self._keep_v1()
            for name in FILES:
                if after[name] != before[name] or (state.migrated and name in (ASSISTANTS, MODELS)):
                    self._write(name, after[name])
        finally:
            os.close(fd)

    def _keep_v1(self) -> None:
        """Copy assistants.toml aside before it is first written in the new form."""
        backup = self.path(V1_BACKUP)
        if not backup.exists():
            self._write(V1_BACKUP, self.path(ASSISTANTS).read_text(encoding="utf-8"))

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by writers that died mid-write (kill -9, power loss).

        Writers create their temp file only while holding the lock, which we
        hold now, so every temp file here belongs to a dead writer.
        """
        for name in (*FILES, V1_BACKUP):
            for tmp in self.root.glob(f".{name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _write(self, name: str, text: str) -> None:
        path = self.path(name)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"{path}: cannot write: {exc}") from exc


def _record(file: Path, where: str, build: Any, *args: Any) -> Any:
    if not isinstance(args[-1], dict):
        raise StateError(f"{file}: [{where}] must be a table")
    try:
        return build(*args)
    except RecordError as exc:
        raise StateError(f"{file}: [{where}] {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"{file}: [{where}] malformed entry: {exc}") from exc


def _serialize(state: State) -> dict[str, str]:
    return {
        USERS: tomli_w.dumps({"users": {n: u.to_toml() for n, u in state.users.items()}}),
        KEYS: tomli_w.dumps({"keys": [k.to_toml() for k in state.keys]}),
        ASSISTANTS: tomli_w.dumps(
            {"assistants": {n: a.to_toml() for n, a in state.assistants.items()}}
        ),
        MODELS: tomli_w.dumps({"models": {n: m.to_toml() for n, m in state.models.items()}}),
    }
