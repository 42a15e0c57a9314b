"""A llama.cpp context: the KV cache of a model worker's sequences, and its decode.

Thread rule, checked on every call: a context is used and freed only by the
thread that created it (its model worker's), and so are the sampler chains
sampled through it. llama.cpp's contexts are not thread-safe; a second thread
would race the worker's decode. The model itself (:mod:`vergeai.runtime.llama`)
is read-only once loaded and may be read from any thread.
"""

from __future__ import annotations

import ctypes
import os
import threading

import llama_cpp
import numpy as np
import numpy.typing as npt

from vergeai.runtime.llama import LoadError, Model, decode_lock
from vergeai.runtime.memory import N_BATCH
from vergeai.runtime.sampler import Sampler

KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class Context:
    """One llama.cpp context holding ``n_seq`` sequences of ``n_ctx_seq`` tokens each."""

    def __init__(
        self,
        model: Model,
        n_ctx_seq: int,
        n_seq: int,
        threads: int | None,
        pooling: int | None = None,
        kv_type: str = "f16",
        flash_attn: str = "auto",
    ) -> None:
        """``pooling`` (a llama_pooling_type) makes an embedding context, not a generating one.

        An embedding input is decoded whole in one batch (pooling needs all its
        tokens at once), so its batch holds a whole sequence.
        """
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        n_batch = N_BATCH if pooling is None else max(N_BATCH, n_ctx_seq)
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        if pooling is not None:
            params.embeddings = True
            params.pooling_type = pooling
        params.n_seq_max = n_seq
        n_threads = threads or os.cpu_count() or 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # A generating context keeps one KV stream per sequence, so a sequence
        # attends over its own cells only, and sliding-window layers keep a
        # window's worth of cells, not the whole context: both cost every decoded
        # token time in proportion to what it attends over. A prefix stays
        # reusable while the window before it is still cached (see reusable).
        # An embedding context reuses nothing and decodes whole inputs together.
        params.swa_full = False
        params.kv_unified = pooling is not None
        params.no_perf = True
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise LoadError("llama.cpp could not create a context (out of memory?)")
        self.ptr = ptr
        self.owner = threading.get_ident()
        self.model = model
        self.n_seq = n_seq
        self.n_ctx_seq = llama_cpp.llama_n_ctx(ptr) // n_seq
        self.n_batch = n_batch
        self.memory = llama_cpp.llama_get_memory(ptr)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq)
        self.n_swa = model.n_swa

    def _check_thread(self) -> None:
        if threading.get_ident() != self.owner:
            raise RuntimeError("a llama.cpp context is used only by the thread that made it")

    def reusable(self, seq: int, keep: int) -> bool:
        """Whether the first ``keep`` cached tokens can continue: the next token
        attends back ``n_swa`` positions in sliding-window layers, and those
        cells must still be in the cache (older ones are overwritten)."""
        self._check_thread()
        if keep == 0 or self.n_swa == 0:
            return True
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq))
        return 0 <= pos_min <= max(0, keep - self.n_swa)

    def clear_from(self, seq: int, pos: int) -> bool:
        self._check_thread()
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, pos, -1))

    def copy_seq(self, src: int, dst: int) -> None:
        """``dst`` gets a copy of ``src``'s cache, whole (llama.cpp copies a whole stream:
        ``dst``'s own cells are dropped); the data is copied at the next decode."""
        self._check_thread()
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, -1)

    def seq_state(self, seq: int) -> bytes:
        """The sequence's KV cache, as llama.cpp's sequence-state API writes it."""
        self._check_thread()
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        n = int(llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq))
        return bytes(buf)[:n]

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        """Load a sequence's KV cache written by :meth:`seq_state` (False: it did not fit
        or was not one)."""
        self._check_thread()
        self.clear_from(seq, 0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        n = int(llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), seq))
        return n == len(data)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """entries: (token, pos, seq, wants_logits). Returns llama_decode's status."""
        self._check_thread()
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        with decode_lock:
            return int(llama_cpp.llama_decode(self.ptr, b))

    def sample(self, sampler: Sampler, index: int) -> int:
        self._check_thread()
        if sampler.argmax is not None:
            logits = self.logits(index)
            ids, bias = sampler.argmax
            if len(ids):
                logits = logits.copy()
                logits[ids] += bias
            token = int(np.argmax(logits))
            if not np.isnan(logits[token]):  # the native greedy pick skips NaNs
                return token
        return int(llama_cpp.llama_sampler_sample(sampler.chain, self.ptr, index))

    def embedding(self, seq: int) -> npt.NDArray[np.float32]:
        """The pooled embedding of a sequence just decoded, L2-normalised (a copy)."""
        self._check_thread()
        ptr = llama_cpp.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise RuntimeError("llama.cpp returned no embedding for the sequence")
        vector = np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).astype(np.float32)
        norm = float(np.linalg.norm(vector))
        result: npt.NDArray[np.float32] = vector / norm if norm > 0 else vector
        return result

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The raw next-token logits at batch output ``index`` (a view; copy to keep)."""
        self._check_thread()
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        array: npt.NDArray[np.float32] = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
        return array

    def free(self) -> None:
        self._check_thread()
        if self.ptr:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
