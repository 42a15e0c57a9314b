"""Cached prefixes kept across an unload: saved to disk when an idle model unloads,
restored into its slots when it loads again.

When a model unloads, each slot's (and the keeper's) KV cache, the system
prompt and conversation it holds, is written with llama.cpp's sequence-state
API to ``<state dir>/prefixes/<model>/``, beside a ``saved.json`` naming the
tokens each holds, whose they are (scope and public part, so the sharing
rules of :mod:`vergeai.runtime.prefix` hold as before) and what they were
made with (the file's path, size and time, the KV type, flash attention,
the context per slot). The next load of the model restores what still
matches; what does not is deleted. The whole directory is held to a disk
cap: the most recently used sequences of the model saved last are kept
first, and other models' saved prefixes, oldest first, make room.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vergeai.runtime.slots import Slot
from vergeai.state.models import ModelRecord

log = logging.getLogger("vergeai.worker")

META = "saved.json"
FORMAT = 1


class SeqStates(Protocol):
    """What saving and restoring needs of a context (its thread's only)."""

    n_ctx_seq: int

    def seq_state(self, seq: int) -> bytes: ...
    def set_seq_state(self, seq: int, data: bytes) -> bool: ...
    def clear_from(self, seq: int, pos: int) -> bool: ...


@dataclass(frozen=True)
class SavedPrefixes:
    root: Path  # <state dir>/prefixes
    cap: int  # bytes the whole directory may hold; 0: nothing is saved

    def _dir(self, model: str) -> Path:
        return self.root / model

    @staticmethod
    def made_with(spec: ModelRecord, n_ctx_seq: int) -> dict[str, Any]:
        """What a saved KV cache is only valid for."""
        try:
            st = os.stat(spec.file)
            file = [os.path.realpath(spec.file), st.st_size, st.st_mtime_ns]
        except OSError:
            file = [spec.file, -1, -1]
        return {
            "format": FORMAT,
            "file": file,
            "kv_type": spec.kv_type,
            "flash_attn": spec.flash_attn,
            "n_ctx_seq": n_ctx_seq,
        }

    def save(self, spec: ModelRecord, ctx: SeqStates, slots: list[Slot]) -> int:
        """Write what the slots' caches hold (most recently used first, within the cap);
        how many sequences were saved. The model's earlier saved set is replaced."""
        folder = self._dir(spec.name)
        shutil.rmtree(folder, ignore_errors=True)
        held = [s for s in slots if s.tokens]
        if not self.cap or not held:
            return 0
        room = self.cap  # the model unloading now is the likeliest to load again
        blobs: list[tuple[Slot, bytes]] = []
        for slot in sorted(held, key=lambda s: -s.last_used):
            data = ctx.seq_state(slot.seq)
            if not data or len(data) > room:
                continue
            room -= len(data)
            blobs.append((slot, data))
        if not blobs:
            return 0
        self._make_room(spec.name, sum(len(d) for _, d in blobs))
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        entries = []
        for i, (slot, data) in enumerate(blobs):
            name = f"seq-{i}.bin"
            _write_private(folder / name, data)
            entries.append(
                {"file": name, "tokens": slot.tokens, "scope": slot.scope, "public": slot.public}
            )
        meta = {"made_with": self.made_with(spec, ctx.n_ctx_seq), "sequences": entries}
        _write_private(folder / META, json.dumps(meta).encode())
        return len(entries)

    def restore(self, spec: ModelRecord, ctx: SeqStates, slots: list[Slot]) -> int:
        """Load the model's saved caches into its free slots (the keeper last); how many
        were restored. A saved set made otherwise is deleted."""
        folder = self._dir(spec.name)
        try:
            meta = json.loads((folder / META).read_bytes())
            entries = list(meta["sequences"])
            current = meta["made_with"] == self.made_with(spec, ctx.n_ctx_seq)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError):
            current = False
        if not current:
            log.info("model %s: saved prefixes no longer match it; deleted", spec.name)
            shutil.rmtree(folder, ignore_errors=True)
            return 0
        restored = 0
        for slot, entry in zip(slots, entries, strict=False):
            try:
                data = (folder / str(entry["file"])).read_bytes()
                tokens = [int(t) for t in entry["tokens"]]
                scope, public = str(entry["scope"]), int(entry["public"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if len(tokens) > ctx.n_ctx_seq or not ctx.set_seq_state(slot.seq, data):
                ctx.clear_from(slot.seq, 0)
                continue
            slot.hold(tokens, scope, public)
            restored += 1
        shutil.rmtree(folder, ignore_errors=True)  # held by the slots now
        return restored

    def _size_of_others(self, model: str) -> int:
        return sum(
            f.stat().st_size
            for folder in self._folders()
            if folder.name != model
            for f in folder.iterdir()
        )

    def _folders(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir()]
        except OSError:
            return []

    def _make_room(self, model: str, size: int) -> None:
        """Delete other models' saved prefixes, oldest first, until ``size`` fits."""
        others = sorted(
            (f for f in self._folders() if f.name != model), key=lambda f: f.stat().st_mtime
        )
        used = self._size_of_others(model)
        for folder in others:
            if used + size <= self.cap:
                return
            used -= sum(f.stat().st_size for f in folder.iterdir())
            shutil.rmtree(folder, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
