"""The GGUF completeness check, against the demo model cut at many places."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from vergeai.gguf import TYPE_SIZES, GgufError, check_gguf


def test_type_sizes_match_gguf_py() -> None:
    known = {t.value: size for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert known == TYPE_SIZES


def test_the_demo_model_is_whole(model_path: str) -> None:
    info = check_gguf(model_path)
    assert info.tensors > 0 and info.expected_size == info.size == Path(model_path).stat().st_size


@pytest.mark.parametrize("keep", [0, 3, 4, 23, 24, 1000, 3_000_000, 50_000_000, -1])
def test_a_cut_file_is_truncated(model_path: str, tmp_path: Path, keep: int) -> None:
    size = Path(model_path).stat().st_size
    keep = size - 1 if keep < 0 else keep
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        cut.write_bytes(src.read(keep))
    with pytest.raises(GgufError) as info:
        check_gguf(cut)
    message = info.value.message
    if keep < 4:
        assert message == "not a GGUF file"
    elif keep >= 50_000_000:
        assert message == f"truncated: {keep} of {size} bytes"
    else:
        assert message.startswith("truncated: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGML" + bytes(60), "not a GGUF file"),
        (b"GGUF" + (1).to_bytes(4, "little") + bytes(40), "unsupported GGUF version 1"),
        (b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(16),
         "corrupt header: implausible tensor or metadata count"),
        (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little")
         + (3).to_bytes(8, "little") + b"abc" + (99).to_bytes(4, "little") + bytes(8),
         "corrupt metadata: unknown value type 99"),
    ],
)  # fmt: skip
def test_corrupt_headers(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(GgufError) as info:
        check_gguf(bad)
    assert info.value.message == message


def test_missing_directory_and_unreadable(tmp_path: Path) -> None:
    for path, message in ((tmp_path / "no.gguf", "file not found"), (tmp_path, "is a directory")):
        with pytest.raises(GgufError) as info:
            check_gguf(path)
        assert message in info.value.message
