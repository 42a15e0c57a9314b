"""Thin, typed wrappers over llama.cpp's C API (llama-cpp-python's low-level bindings).

Models are shared: two assistants on the same GGUF file (and GPU layer
count) use one loaded copy of its memory-mapped weights.

Thread rule: a loaded :class:`Model` is read-only, and any thread may call
its methods (the API tokenizes on the event loop while workers decode); the
scratch buffers they fill are per call or per thread. Only
``shared_models.release`` frees it, when no worker holds it any more. A
context and its samplers belong to one worker thread
(:mod:`vergeai.runtime.context`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING

import llama_cpp

from vergeai.errors import VergeError

if TYPE_CHECKING:
    import llguidance


# One llama_decode at a time per process: each context runs its own CPU
# threads, and ggml's threads spin at their barriers, so two contexts
# decoding at once on the same cores slow each other down many times over.
# Taking turns step by step keeps every core busy with one graph.
decode_lock = threading.Lock()
_backend_ready = False
_backend_lock = threading.Lock()


class LoadError(VergeError):
    pass


GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5
_verbose = False
_llama_log = logging.getLogger("vergeai.llama_cpp")
_partial: list[str] = []  # text of a line that llama.cpp has not ended yet
_last_level = 0


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama-cpp-python's own callback maps ggml's levels wrongly and prints
    # every model-load notice. We pass errors (and, for debug, everything) to
    # Python logging a line at a time, so that text a client controls (a
    # grammar llama.cpp quotes back) is escaped like any other log line.
    global _last_level
    if level != GGML_LOG_CONT:
        _last_level = level
    errors = _last_level == GGML_LOG_ERROR
    if not (_verbose or errors):
        return
    *lines, rest = (("".join(_partial)) + text.decode("utf-8", "replace")).split("\n")
    _partial[:] = [rest]
    for line in lines:
        if line.strip():
            _llama_log.log(logging.WARNING if errors else logging.DEBUG, line)


def init_backend(verbose: bool = False) -> None:
    global _backend_ready, _verbose
    with _backend_lock:
        _verbose = verbose
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


GPU_WARNING = (
    "this llama-cpp-python was built without GPU support, so --gpu-layers {} runs on the CPU; "
    "see the README's 'GPU builds' to rebuild it for CUDA, Metal or Vulkan"
)


def gpu_offload() -> bool:
    """Whether this build of llama.cpp can put layers on a GPU at all."""
    return bool(llama_cpp.llama_supports_gpu_offload())


class Model:
    """One loaded GGUF: weights, vocabulary and metadata."""

    def __init__(self, path: str, gpu_layers: int) -> None:
        init_backend()
        if gpu_layers and not gpu_offload():
            _llama_log.warning(GPU_WARNING.format(gpu_layers))
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
        ptr = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not ptr:
            raise LoadError(f"llama.cpp could not load {path}")
        self.path = path
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.size_bytes: int = llama_cpp.llama_model_size(ptr)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos: int = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos: int = llama_cpp.llama_vocab_eos(self.vocab)
        self.n_embd: int = llama_cpp.llama_model_n_embd(ptr)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(ptr)
        self.n_params: int = llama_cpp.llama_model_n_params(ptr)
        self.n_swa: int = llama_cpp.llama_model_n_swa(ptr)  # 0: no sliding window
        self._piece_bufs = threading.local()  # one scratch buffer per calling thread
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None
        self._grammar_lock = threading.Lock()

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def pooling(self) -> int:
        """How an embedding is pooled: the GGUF's own way, else the mean of the tokens."""
        arch = self.meta("general.architecture") or ""
        pooling = int(self.meta(f"{arch}.pooling_type") or llama_cpp.LLAMA_POOLING_TYPE_NONE)
        if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            raise LoadError("this is a reranking model; it has no embeddings to serve")
        if pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED):
            return int(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        return pooling

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def tokenize(self, text: str, bos: bool = True, add_special: bool = False) -> list[int]:
        """Tokenize a rendered prompt (special tokens parsed; BOS added once, if asked).

        ``add_special``: the vocabulary's own framing instead (BOS and, for
        some embedding models, EOS or SEP), as embedding inputs want.
        """
        data = text.encode("utf-8", "replace")
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, True)
        if n < 0:
            size = -n
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, True)
        tokens = list(buf[:n])
        if (
            bos
            and not add_special
            and self.add_bos
            and self.bos >= 0
            and (not tokens or tokens[0] != self.bos)
        ):
            tokens.insert(0, self.bos)
        return tokens

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The fill-in-the-middle prefix, suffix and middle tokens, if the GGUF names them."""
        ids = (
            llama_cpp.llama_vocab_fim_pre(self.vocab),
            llama_cpp.llama_vocab_fim_suf(self.vocab),
            llama_cpp.llama_vocab_fim_mid(self.vocab),
        )
        return None if min(ids) < 0 else (int(ids[0]), int(ids[1]), int(ids[2]))

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        # threads share a Model (assistants on one GGUF; echo detokenized on the event
        # loop while a worker reports tokens), so the scratch buffer is per thread
        buf = getattr(self._piece_bufs, "buf", None)
        if buf is None:
            buf = self._piece_bufs.buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance reads it, made on first use (about a second for
        262k tokens) and kept; every end-of-generation token ends a grammar."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
                with warnings.catch_warnings():  # it calls a binding renamed since, per token
                    warnings.simplefilter("ignore", DeprecationWarning)
                    tokenizer = lltokenizer_from_vocab(self.vocab, eos_token=eog or None)
                self._grammar_tokenizer = tokenizer
            return self._grammar_tokenizer

    def special_tokens(self, texts: tuple[str, ...]) -> dict[str, int]:
        """Which of these strings the vocabulary has as one special token, and its id."""
        tokenizer = self.grammar_tokenizer()
        out = {}
        for text in texts:
            tokens = self.tokenize(text, bos=False)
            if len(tokens) == 1 and tokenizer.is_special_token(tokens[0]):
                out[text] = tokens[0]
        return out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def free(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


def read_chat_template(path: str) -> str | None:
    """The GGUF's own chat template, reading only its vocabulary and metadata."""
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    ptr = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    if not ptr:
        raise LoadError(f"llama.cpp could not read {path}")
    try:
        raw = llama_cpp.llama_model_chat_template(ptr, None)
        return raw.decode("utf-8", "replace") if raw else None
    finally:
        llama_cpp.llama_model_free(ptr)


class _SharedModels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, int], tuple[Model, int]] = {}

    def acquire(self, path: str, gpu_layers: int) -> Model:
        key = (os.path.realpath(path), gpu_layers)
        with self._lock:
            if key in self._models:
                model, refs = self._models[key]
                self._models[key] = (model, refs + 1)
                return model
            model = Model(path, gpu_layers)
            self._models[key] = (model, 1)
            return model

    def release(self, model: Model) -> None:
        with self._lock:
            key = next((k for k, (m, _) in self._models.items() if m is model), None)
            if key is None:
                return
            _, refs = self._models[key]
            if refs > 1:
                self._models[key] = (model, refs - 1)
            else:
                del self._models[key]
                model.free()


shared_models = _SharedModels()
