"""What an engine is asked to do (a job), and what it reports back (events)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from vergeai.errors import VergeError
from vergeai.runtime.sampling import Sampling
from vergeai.runtime.toolcalls import CallDelta

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Timings:
    """llama-server's ``timings`` object: what was evaluated and generated, and how fast."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    draft_n: int = 0
    draft_n_accepted: int = 0

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n * 1000.0 / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n * 1000.0 / self.predicted_ms if self.predicted_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": self.prompt_ms / self.prompt_n if self.prompt_n else 0.0,
            "prompt_per_second": self.prompt_per_second,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": (
                self.predicted_ms / self.predicted_n if self.predicted_n else 0.0
            ),
            "predicted_per_second": self.predicted_per_second,
            # as llama-server reports speculation
            **(
                {"draft_n": self.draft_n, "draft_n_accepted": self.draft_n_accepted}
                if self.draft_n
                else {}
            ),
        }


@dataclass
class Delta:
    text: str
    logprobs: list[dict[str, Any]] | None = None  # one entry per token, when asked for
    reasoning: str = ""  # split off already, by an upstream server
    calls: tuple[CallDelta, ...] = ()  # tool calls an upstream server parsed


@dataclass
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    stop_word: str | None = None  # the stop string that ended it, if one did


@dataclass
class Embedded:
    """An embedding job's result: its input's pooled, L2-normalised embedding."""

    vector: Any  # a float32 numpy array


@dataclass
class Failed:
    message: str
    retry_after: int | None = None  # set when the assistant itself is unavailable for now
    error: VergeError | None = None  # the error to answer, when the job knows it


Event = Delta | Embedded | Finished | Failed


@dataclass(kw_only=True, eq=False)
class Task:
    """What every engine's job has: where its events go (``(choice, event)`` on
    ``queue``), whether its client left, and how far it got."""

    choice: int = 0
    queue: asyncio.Queue[tuple[int, Event]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_created: float = field(default_factory=time.perf_counter)
    # filled in by the engine
    n_generated: int = 0
    t_start: float = 0.0
    t_first: float = 0.0

    def emit(self, event: Event) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        self.cancelled.set()

    def group(self) -> list[Task]:
        """This job and those that share its prompt (a leader's followers)."""
        return [self]

    @property
    def prompt_tokens(self) -> int:
        """Its prompt's tokens, as far as they are known before it runs."""
        raise NotImplementedError


@dataclass(frozen=True)
class Generate:
    """What a generation asks of the local model: how to sample, how much, when to stop."""

    sampling: Sampling
    max_tokens: int
    stop: list[str]
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives


@dataclass(kw_only=True, eq=False)
class Job(Task):
    """Tokens for a local model worker: one choice of a generation, or an embedding of
    the tokens (``generate`` None). A request for n choices is a leader with n-1
    followers: they share the leader's prompt, which the worker evaluates once and
    copies to their sequences.
    """

    tokens: list[int]
    loop: asyncio.AbstractEventLoop  # where the events go, from the worker thread
    generate: Generate | None
    # Whose prompt it is, for the prefix cache: past its first ``public`` tokens (the
    # assistant's system prompt, which every caller shares) a cached prefix is reused
    # only within one scope, so that no caller learns what another asked.
    scope: str = ""
    public: int = 0
    followers: list[Job] = field(default_factory=list)
    # filled in by the worker thread
    cache_n: int = 0
    draft_n: int = 0  # tokens proposed by speculation and checked
    draft_accepted: int = 0  # of those, the ones the sampler picked

    @property
    def embed(self) -> bool:
        return self.generate is None

    def group(self) -> list[Task]:
        return [self, *self.followers]

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens)

    def emit(self, event: Event) -> None:
        held: list[tuple[Job, Event]] | None = getattr(_held, "events", None)
        if held is not None:
            held.append((self, event))
        else:
            _send(self.loop, [(self, event)])

    def cancel(self) -> None:
        super().cancel()
        for follower in self.followers:
            follower.cancelled.set()

    @property
    def slots_needed(self) -> int:
        return 1 + len(self.followers)

    def timings(self) -> Timings:
        end = time.perf_counter()
        return Timings(
            cache_n=self.cache_n,
            prompt_n=len(self.tokens) - self.cache_n,
            prompt_ms=(self.t_first - self.t_start) * 1000.0,
            predicted_n=self.n_generated,
            predicted_ms=(end - self.t_first) * 1000.0,
            draft_n=self.draft_n,
            draft_n_accepted=self.draft_accepted,
        )


_held = threading.local()  # a thread that holds its events (see hold_events)


def hold_events() -> None:
    """From now on this thread's emitted events wait for ``hand_over``.

    A model worker hands them over just before it decodes, and before it
    waits: the event loop then formats and sends them while the worker is
    inside llama_decode, which releases the GIL, instead of taking the GIL
    from the worker between two decodes.
    """
    _held.events = []


def hand_over() -> None:
    """Deliver this thread's held events, in order, one hand-off per event loop."""
    events: list[tuple[Job, Event]] = getattr(_held, "events", None) or []
    if not events:
        return
    _held.events = []
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        _send(loop, batch)


def _send(loop: asyncio.AbstractEventLoop, batch: list[tuple[Job, Event]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, batch)
    except RuntimeError:  # the loop is gone: nobody is listening any more
        for job, _ in batch:
            job.cancelled.set()


def _deliver(batch: list[tuple[Job, Event]]) -> None:
    for job, event in batch:
        job.queue.put_nowait((job.choice, event))
