"""The engine contract: what the API and the pool may ask of whatever serves assistants.

A local model worker (:class:`vergeai.runtime.worker.Worker`) and a set of
upstream replicas (:class:`vergeai.upstream.replicas.Remote`) both implement
:class:`Engine`; the model kinds still to come will too. Only the place that
builds engines (:mod:`vergeai.pool`) knows which class it made; everyone
else reads the contract. This module is plain data: no ``llama_cpp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import llguidance

    from vergeai.runtime.job import Task
    from vergeai.runtime.prompt import ChatTemplate


class WorkerState(StrEnum):
    LOADING = "loading"
    ONLINE = "online"
    ERROR = "error"  # the model could not be loaded; an admin has to act
    RESTARTING = "restarting"  # the thread died; the pool replaces the worker
    DEGRADED = "degraded"  # one step has run past its bound: wedged, or far too slow
    OFFLINE = "offline"
    UNLOADED = "unloaded"  # an on-demand model not loaded now: its first request loads it


class LoadedModel(Protocol):
    """A loaded model as the API sees it: facts, and a vocabulary whose methods are
    safe from any thread (llama.cpp's vocabulary is read-only once loaded; the
    scratch buffers they use are per call or per thread)."""

    n_vocab: int
    n_embd: int
    n_ctx_train: int
    n_params: int
    size_bytes: int
    bos: int
    add_bos: bool

    def tokenize(self, text: str, bos: bool = True, add_special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def fim_tokens(self) -> tuple[int, int, int] | None: ...
    def special_tokens(self, texts: tuple[str, ...]) -> dict[str, int]: ...
    def grammar_tokenizer(self) -> llguidance.LLTokenizer: ...


@dataclass(frozen=True)
class ModelFacts:
    """What the API may know of a model loaded here, read from any thread.

    Set once the model is loaded, never changed after. ``model`` is the one
    native object the API touches, through :class:`LoadedModel` only.
    """

    n_ctx: int  # tokens per conversation (one slot)
    model: LoadedModel
    template: ChatTemplate | None  # None: an embedding model
    embedding: bool


class Engine(Protocol):
    """Serves a model's assistants (or a remote assistant): jobs in, events out (see
    :mod:`vergeai.runtime.job`)."""

    name: str
    restarts: int  # how many engines of this model (or remote assistant) died before this one
    ended_at: float  # time.monotonic() when its thread ended; 0 while it runs
    load_seconds: float  # how long the model took to load (0 for an upstream)

    @property
    def state(self) -> WorkerState: ...
    @property
    def problem(self) -> str | None: ...  # what keeps it from serving, if anything
    @property
    def crashed(self) -> bool: ...  # its thread died while it should be serving
    @property
    def facts(self) -> ModelFacts | None: ...  # None: the model is not here (upstream)
    @property
    def share(self) -> int: ...  # the most slots one request may hold at once
    @property
    def busy(self) -> int: ...  # requests being answered now
    @property
    def queued(self) -> int: ...  # requests waiting for a slot

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def alive(self) -> bool: ...
    def submit(self, job: Task) -> None: ...  # its own kind of job, else TypeError
    def stats(self) -> dict[str, Any]: ...
