"""Check that a GGUF file is whole before llama.cpp is asked to load it.

Reads the header, the metadata and the tensor table, and compares where the
last tensor's data ends with the file's size, so that a truncated download
is reported as such ("truncated: N of M bytes") instead of as a failed load.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from vergeai.errors import VergeError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_COUNT = 1 << 24  # tensors or metadata entries; far above any real model
QK_K = 256

# ggml type id -> (elements per block, bytes per block), as in gguf-py's GGML_QUANT_SIZES
TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 2 + 16),  # Q4_0
    3: (32, 2 + 2 + 16),  # Q4_1
    6: (32, 2 + 4 + 16),  # Q5_0
    7: (32, 2 + 2 + 4 + 16),  # Q5_1
    8: (32, 2 + 32),  # Q8_0
    9: (32, 4 + 4 + 32),  # Q8_1
    10: (QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),  # Q2_K
    11: (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),  # Q3_K
    12: (QK_K, 2 + 2 + QK_K // 2 + 12),  # Q4_K
    13: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),  # Q5_K
    14: (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),  # Q6_K
    15: (QK_K, 4 + QK_K + QK_K // 8),  # Q8_K
    16: (QK_K, 2 + QK_K // 4),  # IQ2_XXS
    17: (QK_K, 2 + QK_K // 4 + QK_K // 32),  # IQ2_XS
    18: (QK_K, 2 + QK_K // 4 + QK_K // 8),  # IQ3_XXS
    19: (QK_K, 2 + QK_K // 8 + QK_K // 16),  # IQ1_S
    20: (32, 2 + 16),  # IQ4_NL
    21: (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),  # IQ3_S
    22: (QK_K, 2 + QK_K // 4 + QK_K // 16),  # IQ2_S
    23: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # IQ1_M
    30: (1, 2),  # BF16
    34: (QK_K, 2 + 4 * 13),  # TQ1_0
    35: (QK_K, 2 + 64),  # TQ2_0
    39: (32, 1 + 16),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}

# metadata value type -> struct format of a scalar; 8 is a string, 9 an array
SCALARS = dict(zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd", strict=True))
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class GgufError(VergeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_model_file"


@dataclass(frozen=True)
class GgufInfo:
    version: int
    tensors: int
    metadata: int
    expected_size: int  # where the last tensor's data ends
    size: int
    chat_template: bool = False  # whether it carries its own (tokenizer.chat_template)
    architecture: str = ""
    numbers: dict[str, int] = field(default_factory=dict)  # its integer metadata by key
    n_vocab: int = 0  # entries in tokenizer.ggml.tokens
    tensor_bytes: int = 0  # its tensors' data, padding included

    def number(self, key: str, default: int = 0) -> int:
        """The architecture's integer metadata (``block_count``: ``gemma3.block_count``)."""
        return self.numbers.get(f"{self.architecture}.{key}", default)


class _Reader:
    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated
        self.pos += n

    def string(self) -> bytes:
        n = self.unpack("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.data[start : self.pos])

    def value(self, kind: int, depth: int = 0) -> int | None:
        """Skip one metadata value; returns it when it is an integer scalar."""
        if kind in SCALARS:
            fmt = SCALARS[kind]
            if fmt in "fd?":
                self.skip(struct.calcsize(fmt))
                return None
            return self.unpack(fmt)
        if kind == STRING:
            self.string()
            return None
        if kind == ARRAY and depth < 2:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in SCALARS:
                self.skip(count * struct.calcsize("<" + SCALARS[item]))
            elif item == STRING:  # vocabularies: hundreds of thousands of strings
                pos, size = self.pos, len(self.data)
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated
                    pos += 8 + _U64.unpack_from(self.data, pos)[0]
                self.skip(pos - self.pos)
            else:
                if count > len(self.data):
                    raise _Truncated
                for _ in range(count):
                    self.value(item, depth + 1)
            return None
        raise GgufError(f"corrupt metadata: unknown value type {kind}")


class _Truncated(Exception):
    pass


def check_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """The file's layout, or a GgufError saying plainly what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                if fh.read(4) != MAGIC:
                    raise GgufError("not a GGUF file")
                raise GgufError(f"truncated: {size} bytes, not even a whole header")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _layout(data, size)
    except FileNotFoundError:
        raise GgufError("file not found") from None
    except IsADirectoryError:
        raise GgufError("is a directory, not a GGUF file") from None
    except PermissionError:
        raise GgufError("permission denied") from None
    except OSError as exc:
        raise GgufError(f"cannot read: {exc.strerror or exc}") from None


def _layout(data: mmap.mmap, size: int) -> GgufInfo:
    if data[:4] != MAGIC:
        raise GgufError("not a GGUF file")
    r = _Reader(data)
    r.skip(4)
    try:
        version = r.unpack("I")
        if version not in (2, 3):
            raise GgufError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise GgufError("corrupt header: implausible tensor or metadata count")
        alignment = DEFAULT_ALIGNMENT
        chat_template = False
        architecture = ""
        numbers: dict[str, int] = {}
        n_vocab = 0
        for _ in range(n_kv):
            key = r.string()
            kind = r.unpack("I")
            start = r.pos
            if key == b"general.architecture" and kind == STRING:
                architecture = r.string()[:64].decode("utf-8", "replace")
                continue
            value = r.value(kind)
            if value is not None:
                numbers[key[:256].decode("utf-8", "replace")] = value
            if key == b"general.alignment" and value:
                alignment = value
            elif key == b"tokenizer.chat_template":
                chat_template = kind == STRING and r.pos - start > 8  # a non-empty string
            elif key == b"tokenizer.ggml.tokens" and kind == ARRAY:
                n_vocab = _U64.unpack_from(data, start + 4)[0]
        end = 0
        for _ in range(n_tensors):
            r.string()
            n_dims = r.unpack("I")
            if n_dims > 8:
                raise GgufError("corrupt tensor table: too many dimensions")
            elements = 1
            for _ in range(n_dims):
                elements *= r.unpack("Q")
            kind, offset = r.unpack("I"), r.unpack("Q")
            block, block_bytes = TYPE_SIZES.get(kind, (1, 0))  # unknown type: offset only
            end = max(end, offset + elements // block * block_bytes)
    except _Truncated:
        raise GgufError(f"truncated: {size} bytes end inside the header") from None
    data_start = -(-r.pos // alignment) * alignment
    expected = data_start + end
    if size < expected:
        raise GgufError(f"truncated: {size} of {expected} bytes")
    return GgufInfo(
        version, n_tensors, n_kv, expected, size, chat_template, architecture, numbers, n_vocab, end
    )
