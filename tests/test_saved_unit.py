"""SavedPrefixes' bookkeeping (what is kept within the disk cap, what is dropped), over a
context stand-in that holds sequence states as bytes; the native round trip is tested on
a real model in test_models.py."""

from __future__ import annotations

from pathlib import Path

from vergeai.runtime.saved import SavedPrefixes
from vergeai.runtime.slots import Slot
from vergeai.state.models import ModelRecord


class Cache:
    n_ctx_seq = 64

    def __init__(self) -> None:
        self.states: dict[int, bytes] = {}

    def seq_state(self, seq: int) -> bytes:
        return self.states.get(seq, b"")

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        self.states[seq] = data
        return True

    def clear_from(self, seq: int, pos: int) -> bool:
        self.states.pop(seq, None)
        return True


def slots(*held: tuple[int, float]) -> list[Slot]:
    """Slots holding ``n`` tokens each, used at the times given."""
    out = []
    for seq, (n, used) in enumerate(held):
        slot = Slot(seq=seq, last_used=used)
        slot.hold(list(range(n)), f"user{seq}", min(n, 4))
        out.append(slot)
    return out


def model(tmp_path: Path, name: str) -> ModelRecord:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF")
    return ModelRecord(name=name, file=str(path))


def test_the_most_recently_used_are_kept_within_the_cap(tmp_path: Path) -> None:
    saved = SavedPrefixes(tmp_path / "prefixes", cap=250)
    cache = Cache()
    held = slots((10, 1.0), (20, 3.0), (30, 2.0), (0, 4.0))
    for s in held:
        cache.states[s.seq] = bytes(100) if s.tokens else b""
    spec = model(tmp_path, "m")
    assert saved.save(spec, cache, held) == 2  # two of 100 bytes fit in 250
    fresh = Cache()
    into = [Slot(seq=i) for i in range(4)]
    assert saved.restore(spec, fresh, into) == 2
    assert [len(s.tokens) for s in into] == [20, 30, 0, 0]  # by recency: slot 1, then slot 2
    assert into[0].scope == "user1" and into[0].public == 4
    assert not (tmp_path / "prefixes" / "m").exists()


def test_another_models_saved_prefixes_make_room_oldest_first(tmp_path: Path) -> None:
    saved = SavedPrefixes(tmp_path / "prefixes", cap=2500)  # two models' saved sets
    cache = Cache()
    cache.states = {0: bytes(1000)}
    for name in ("old", "newer"):
        assert saved.save(model(tmp_path, name), cache, slots((5, 1.0))) == 1
    assert saved.save(model(tmp_path, "now"), cache, slots((5, 1.0))) == 1
    kept = {p.name for p in (tmp_path / "prefixes").iterdir()}
    assert kept == {"newer", "now"}


def test_a_changed_file_or_setting_drops_what_was_saved(tmp_path: Path) -> None:
    saved = SavedPrefixes(tmp_path / "prefixes", cap=1000)
    cache = Cache()
    cache.states = {0: bytes(10)}
    spec = model(tmp_path, "m")
    saved.save(spec, cache, slots((5, 1.0)))
    Path(spec.file).write_bytes(b"GGUF, another one")
    assert saved.restore(spec, Cache(), [Slot(seq=0)]) == 0
    assert not (tmp_path / "prefixes" / "m").exists()
    saved.save(spec, cache, slots((5, 1.0)))
    spec.kv_type = "q8_0"
    assert saved.restore(spec, Cache(), [Slot(seq=0)]) == 0
    (tmp_path / "prefixes" / "m").mkdir(parents=True)
    (tmp_path / "prefixes" / "m" / "saved.json").write_text("{not json")
    assert saved.restore(spec, Cache(), [Slot(seq=0)]) == 0  # a damaged record: dropped


def test_nothing_is_saved_with_no_cap(tmp_path: Path) -> None:
    saved = SavedPrefixes(tmp_path / "prefixes", cap=0)
    cache = Cache()
    cache.states = {0: bytes(10)}
    assert saved.save(model(tmp_path, "m"), cache, slots((5, 1.0))) == 0
    assert not (tmp_path / "prefixes").exists()
