"""What a model costs in memory: estimated from its GGUF before it loads, measured after.

The estimate is the tensors' bytes, the KV cache for the model's context,
slots and KV type (sliding-window layers keep a window's worth of cells
per slot, not the whole context, as the context is made with ``swa_full``
off), and the compute and output buffers the largest step needs. The
measure is the resident memory the load added; buffers that grow with use
(the compute and output buffers) are added to it from the estimate. Plain
data: no ``llama_cpp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vergeai.gguf import GgufInfo, check_gguf
from vergeai.runtime.speculate import MAX_DRAFT, MAX_DRAFTING
from vergeai.state.models import ModelRecord

# bytes per KV element; q8_0 and q4_0 hold blocks of 32 with an f16 scale
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# every n-th layer attends over the whole context, the others over a window
# (llama.cpp's set_swa_pattern for these architectures); an architecture not
# listed with a sliding window is counted as attending over the whole context
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "llama4": 4, "gpt-oss": 2, "exaone4": 4}
CELL_PAD = 256  # llama.cpp pads a KV stream's cells to this
N_BATCH = 512  # a generating context's batch (runtime.context)
LOAD_OVERHEAD = 16 << 20  # a context's fixed allocations, beyond its buffers


@dataclass(frozen=True)
class Cost:
    """Bytes a loaded model holds: its weights (shared by models on one file) and its
    context (KV cache, compute and output buffers)."""

    weights: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.context


def _pad(n: int) -> int:
    return -(-n // CELL_PAD) * CELL_PAD


def n_seqs(spec: ModelRecord, swa: bool) -> int:
    """A context's sequences: one per slot, and the prefix keeper's for a sliding-window
    chat model (see Prefixes.keeper)."""
    return spec.parallel + (swa and not spec.embedding)


def kv_bytes(info: GgufInfo, spec: ModelRecord) -> int:
    """The KV cache of the model's context, as llama.cpp allocates it."""
    n_layer = info.number("block_count", 1)
    n_head = max(1, info.number("attention.head_count", 1))
    head = info.number("embedding_length") // n_head
    per_cell = info.number("attention.head_count_kv", n_head) * (
        info.number("attention.key_length", head) + info.number("attention.value_length", head)
    )
    element = KV_ELEMENT_BYTES[spec.kv_type]
    n_swa = info.number("attention.sliding_window")
    pattern = SWA_PATTERNS.get(info.architecture, 1) if n_swa else 1
    swa_layers = n_layer - n_layer // pattern if pattern > 1 else 0
    seqs = n_seqs(spec, n_swa > 0)
    if spec.embedding:  # one stream of every slot's cells; the batch holds a whole input
        full = _pad(spec.ctx * seqs)
        window = min(full, _pad(n_swa * seqs + max(N_BATCH, spec.ctx)))
    else:  # a stream per sequence
        full = _pad(spec.ctx) * seqs
        window = min(_pad(spec.ctx), _pad(n_swa + N_BATCH)) * seqs
    cells = (n_layer - swa_layers) * full + swa_layers * window
    return int(cells * per_cell * element)


def buffer_bytes(info: GgufInfo, spec: ModelRecord) -> int:
    """The compute buffer's activations for a full batch, and the logits of the most
    outputs one step asks for (held twice: the graph's and the context's copy)."""
    n_embd = info.number("embedding_length")
    n_ff = info.number("feed_forward_length", 4 * n_embd)
    batch = max(N_BATCH, spec.ctx) if spec.embedding else N_BATCH
    activations = batch * (n_ff + 4 * n_embd) * 4 * 2
    if spec.embedding:
        outputs = n_seqs(spec, False) * n_embd * 4
    else:
        drafting = min(spec.parallel, MAX_DRAFTING) if spec.speculate == "ngram" else 0
        rows = min(N_BATCH, spec.parallel + drafting * MAX_DRAFT)
        outputs = 2 * rows * info.n_vocab * 4
    return activations + outputs


def estimate(spec: ModelRecord) -> Cost:
    """The model's cost before loading it (a GgufError for a file that is not a whole
    GGUF)."""
    info = check_gguf(spec.file)
    context = kv_bytes(info, spec) + buffer_bytes(info, spec) + LOAD_OVERHEAD
    return Cost(info.tensor_bytes, context)


def resident_bytes() -> int:
    """This process's resident memory (RSS)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
