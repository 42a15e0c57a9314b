"""One online assistant: a llama.cpp context with N slots, decoded by one thread.

The thread is the context's only user. Requests wait in a bounded FIFO
queue; each step it moves waiting jobs into free slots (the slot whose
cached tokens share the longest prefix with the prompt; a prefix another
slot holds, or is decoding, is copied from it), then decodes one batch
holding every active slot's next tokens (continuous batching), and samples
each slot with its own sampler chain.

Whatever goes wrong with one request (its sampler, a failed decode of its
tokens, an exception while sampling it) fails that request alone and frees
its slot; the other slots keep generating. Anything else that escapes the
loop ends the thread in state ``restarting``, and the pool starts a new one.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vergeai.errors import ContextOverflow, InvalidRequest, QueueFull, Unavailable
from vergeai.gguf import GgufError, check_gguf
from vergeai.runtime.constraint import Constraint, NoTokenAllowed
from vergeai.runtime.context import Context
from vergeai.runtime.engine import ModelFacts, WorkerState
from vergeai.runtime.job import (
    Delta,
    Embedded,
    Failed,
    Finished,
    FinishReason,
    Job,
    hand_over,
    hold_events,
)
from vergeai.runtime.llama import Model, shared_models
from vergeai.runtime.logprobs import entry, log_softmax
from vergeai.runtime.prompt import ChatTemplate, Message
from vergeai.runtime.reasoning import close_open_think, prompt_opens_think
from vergeai.runtime.sampler import Sampler, build_sampler, free_sampler
from vergeai.runtime.speculate import MAX_DRAFT, Drafter
from vergeai.runtime.stops import StopMatcher
from vergeai.runtime.templating import build_template
from vergeai.state.records import Assistant

log = logging.getLogger("vergeai.worker")


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # still to decode
    sampler: Sampler | None = None
    decoder: Any = None
    stops: StopMatcher | None = None
    last_used: float = 0.0
    leader: Slot | None = None  # a follower waits here until its leader's prompt is decoded
    drafter: Drafter | None = None  # proposes tokens to check in the next step, if speculating
    drafted: int = 0  # the last pending tokens are a draft, this many
    keep_at: int = 0  # once this many prompt tokens are decoded, the keeper gets them
    awaiting: Awaiting | None = None  # the job starts once another slot has decoded its prefix
    scope: str = ""  # whose prompt its cached tokens are (see Job.scope)
    public: int = 0  # how many of them any scope may reuse
    constraint: Constraint | None = None  # the request's grammar, where this sequence is in it

    def shared_with(self, job: Job) -> int:
        """How many of its cached tokens the job's prompt may reuse."""
        return reusable(self.tokens, self.scope, self.public, job)

    @property
    def prompting(self) -> bool:
        """Its prompt is still being decoded (a generating slot has its token and a draft)."""
        return len(self.pending) - self.drafted > 1


@dataclass
class Awaiting:
    """A prompt waiting for another slot, which is decoding a prompt that starts alike,
    to have decoded the first ``until`` tokens: they are then copied, not decoded again."""

    donor: Slot
    job: Job  # the donor's job; another one there (or none) ends the wait
    until: int

    @property
    def over(self) -> bool:
        return self.donor.job is not self.job or len(self.donor.tokens) >= self.until


@dataclass
class Rendered:
    text: str
    tokens: list[int]
    opens_think: bool  # the prompt leaves a <think> block open: output starts as reasoning


RESTART_RETRY_AFTER = 2
STEP_BOUND = (
    60.0  # seconds one step (decode, masks, sampling) may take before the worker is degraded
)
MIN_SHARED = 16  # tokens another slot's cache must add to a slot's own to be copied in
PREFILL_CHUNK = 128  # prompt tokens per step while other sequences generate
MAX_DRAFTING = 4  # generating sequences beyond which a step carries no drafts
PROMPTING_DRAFT = 16  # draft tokens, all slots together, in a step that decodes a long prompt
SLACK = 4  # cached tokens a prompt may differ in at the end and still take the slot
KEEP_MIN = 64  # tokens two prompts must share for the keeper to hold them for later ones


def _constraint(job: Job) -> Constraint | None:
    grammar = job.sampling.grammar
    return grammar.start() if grammar is not None else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(tokens: list[int], scope: str, public: int, job: Job) -> int:
    """How much of cached ``tokens`` (a prompt of ``scope`` whose first ``public`` tokens
    any caller may share) the job's prompt may reuse: all it starts alike within one
    scope; across scopes only what both share publicly (the assistant's system prompt),
    so that neither the cache counters nor the time to the first token tell one caller
    what another asked."""
    n = common_prefix(tokens, job.tokens)
    return n if scope == job.scope else min(n, public, job.public)


class Worker:
    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self.name = assistant.name
        self.status = WorkerState.LOADING
        self.error: str | None = None
        self.model: Model | None = None
        self.ctx: Context | None = None
        self.template: ChatTemplate | None = None
        self._facts: ModelFacts | None = None
        self.slots: list[Slot] = []
        # A sliding-window model's slot forgets what lies a window before its end, so a
        # shared prefix (a system prompt) is gone from every slot once their answers
        # run long; an extra sequence, never decoded, keeps the latest one two prompts
        # shared, for the requests after them.
        self.keeper: Slot | None = None
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.restarts = 0  # how many workers of this assistant died before this one
        self.ended_at = 0.0  # time.monotonic() when the thread ended
        self.requests_served = 0
        self.tokens_generated = 0
        self.started_at = time.time()
        self.load_seconds = 0.0
        self.last_prompt_per_second = 0.0
        self.last_predicted_per_second = 0.0
        self.step_bound = STEP_BOUND
        self.step_since = 0.0  # time.monotonic() when the running step began; 0: none runs
        self.thread = threading.Thread(target=self._run, name=f"worker-{self.name}", daemon=True)

    # lifecycle

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Refuse new work, fail queued jobs, let active ones finish, then free."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def facts(self) -> ModelFacts | None:
        """The loaded model's facts for the API; None until it is loaded."""
        return self._facts

    @property
    def crashed(self) -> bool:
        """The thread died while the assistant should be serving."""
        return (
            not self.stopping
            and self.ended_at > 0
            and self.status in (WorkerState.ONLINE, WorkerState.RESTARTING)
        )

    @property
    def state(self) -> WorkerState:
        """What the worker can do now, a dead thread counted as restarting."""
        if self.crashed:
            return WorkerState.RESTARTING
        if self.status == WorkerState.ONLINE and self.stuck_for > self.step_bound:
            return WorkerState.DEGRADED
        return self.status

    @property
    def stuck_for(self) -> float:
        """Seconds the running step has taken so far (0 between steps)."""
        since = self.step_since
        return time.monotonic() - since if since else 0.0

    @property
    def problem(self) -> str | None:
        """What keeps it from serving, for /health and the workers view."""
        if self.state == WorkerState.DEGRADED:
            return (
                f"one step has run for {self.stuck_for:.0f} s, past its bound of "
                f"{self.step_bound:g} s"
            )
        return self.error

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def share(self) -> int:
        """The most slots one request may hold at once: all but one, so that it never
        holds every slot while another request waits (all of them with one slot)."""
        return max(1, len(self.slots) - 1)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx_seq if self.ctx else self.assistant.ctx

    def stats(self) -> dict[str, Any]:
        a = self.assistant
        return {
            "assistant": self.name,
            "model": a.display_model,
            "model_path": a.model,
            "state": self.state,
            "error": self.problem,
            "restarts": self.restarts,
            "ctx": self.n_ctx,
            "parallel": a.parallel,
            "threads": a.threads or os.cpu_count() or 1,
            "gpu_layers": a.gpu_layers,
            "model_bytes": self.model.size_bytes if self.model else 0,
            "kv_cache_bytes": self.ctx.kv_bytes if self.ctx else 0,
            "requests_served": self.requests_served,
            "busy_slots": self.busy,
            "queue_depth": self.queued,
            "tokens_generated": self.tokens_generated,
            "last_prompt_per_second": round(self.last_prompt_per_second, 2),
            "last_predicted_per_second": round(self.last_predicted_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    # called from the event loop

    def check_prompt(self, tokens: list[int], param: str = "messages") -> None:
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(
                f"the request has {len(tokens)} prompt tokens, more than the assistant's "
                f"context of {self.n_ctx} tokens allows",
                param=param,
                extra={"n_prompt_tokens": len(tokens), "n_ctx": self.n_ctx},
            )

    def tokenize(self, text: str) -> list[int]:
        assert self.model is not None
        return self.model.tokenize(text)

    def render(
        self,
        messages: list[Message],
        enable_thinking: bool | None,
        tools: list[dict[str, Any]] | None = None,
        continue_final: bool = False,
    ) -> Rendered:
        """Messages (and tools) to prompt tokens, thinking switched as asked where it can be.

        A template without an enable_thinking switch that opens a think block
        itself gets that block closed empty when thinking is off.
        ``continue_final``: the final assistant message is continued, not closed.
        """
        assert self.template is not None and self.model is not None
        text = self.template.render(
            messages, enable_thinking=enable_thinking, tools=tools, continue_final=continue_final
        )
        if enable_thinking is False and not self.template.supports_thinking:
            text = close_open_think(text)
        return Rendered(text, self.model.tokenize(text), prompt_opens_think(text))

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping or self.status != WorkerState.ONLINE:
                raise Unavailable(f"assistant {self.name!r} is going offline", retry_after=5)
            free = sum(1 for s in self.slots if s.job is None)
            if any(j.cancelled.is_set() for j in self.waiting):  # their clients left
                self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.assistant.max_queue + free:
                raise QueueFull(
                    f"assistant {self.name!r} has {len(self.waiting)} requests waiting; "
                    "try again shortly",
                    retry_after=1,
                )
            self.waiting.append(job)
            self.cond.notify_all()

    # the worker thread

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            a = self.assistant
            check_gguf(a.model)
            self.model = shared_models.acquire(a.model, a.gpu_layers)
            if a.embedding:
                pooling = self.model.pooling()
                self.ctx = Context(self.model, a.ctx, a.parallel, a.threads, pooling)
            else:
                self.template = build_template(a, self.model)
                self.keeper = Slot(seq=a.parallel) if self.model.n_swa > 0 else None
                n_seq = a.parallel + (self.keeper is not None)
                self.ctx = Context(self.model, a.ctx, n_seq, a.threads)
            self.slots = [Slot(seq=i) for i in range(a.parallel)]
        except Exception as exc:  # llama.cpp reports load failures many ways
            self.error = str(exc) or type(exc).__name__
            if isinstance(exc, GgufError):
                self.error = f"model file {a.model}: {exc}"
            self._set_status(WorkerState.ERROR)
            log.error("assistant %s failed to load: %s", self.name, self.error)
            self._release()
            return
        self.load_seconds = time.perf_counter() - t0
        self._facts = ModelFacts(self.ctx.n_ctx_seq, self.model, self.template, a.embedding)
        self._set_status(WorkerState.ONLINE)
        log.info("assistant %s online in %.2fs", self.name, self.load_seconds)
        hold_events()
        try:
            while self._step():
                pass
        except Exception as exc:
            log.exception("assistant %s: the worker thread died; it will be restarted", self.name)
            self.error = f"worker thread died: {exc}"
            self._set_status(WorkerState.RESTARTING)
            for slot in self.slots:
                if slot.job:
                    slot.job.emit(Failed(self.error, retry_after=RESTART_RETRY_AFTER))
                    slot.job = None
        finally:
            with self.cond:
                gone = "is restarting" if self.status == WorkerState.RESTARTING else "went offline"
                for job in self.waiting:
                    job.emit(Failed(f"assistant {self.name!r} {gone}", retry_after=1))
                self.waiting.clear()
                if self.status == WorkerState.ONLINE and self.stopping:
                    self.status = WorkerState.OFFLINE
            hand_over()
            self._release()
            self.ended_at = time.monotonic()

    def _set_status(self, status: WorkerState) -> None:
        with self.cond:
            self.status = status

    def _release(self) -> None:
        self._facts = None
        for slot in self.slots:
            if slot.sampler is not None:
                free_sampler(slot.sampler)
                slot.sampler = None
        if self.ctx is not None:
            self.ctx.free()
            self.ctx = None
        if self.model is not None:
            shared_models.release(self.model)
            self.model = None

    def _step(self) -> bool:
        with self.cond:
            while True:
                for slot in self.slots:
                    if slot.job is not None and slot.job.cancelled.is_set():
                        self._finish(slot, None)
                if self.stopping:
                    for job in self.waiting:
                        job.emit(Failed(f"assistant {self.name!r} went offline"))
                    self.waiting.clear()
                self._admit()
                if any(s.job is not None for s in self.slots):
                    break
                if self.stopping:
                    return False
                hand_over()
                self.cond.wait()
        self.step_since = time.monotonic()
        try:
            self._decode_step()
        finally:
            self.step_since = 0.0
        return True

    def _admit(self) -> None:
        """Move waiting jobs, in order, into free slots: a request for n choices takes n."""
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled.is_set():
                self.waiting.popleft()
                continue
            free = [s for s in self.slots if s.job is None]
            if len(free) < job.slots_needed:
                return
            self.waiting.popleft()
            slot = self._slot_for(job, free)
            slot.job = job
            try:
                self._begin_or_await(slot, job)
            except Exception as exc:
                # the leader's failure fails the whole request; its followers never start
                self._fail(slot, f"could not start generating: {exc}", exc)
                continue
            others = sorted((s for s in free if s is not slot), key=lambda s: s.last_used)
            for follower, spare in zip(job.followers, others, strict=False):
                spare.job = follower
                try:
                    self._start_follower(spare, follower, slot)
                except Exception as exc:
                    self._fail(spare, f"could not start generating: {exc}", exc)

    @staticmethod
    def _slot_for(job: Job, free: list[Slot]) -> Slot:
        """The free slot whose cache holds most of the job's prompt, unless that would
        throw away another conversation.

        A slot the prompt merely starts like (a shared system prompt, a common
        opening) is kept for its own next turn: another free slot, an empty one
        or else the least recently used, takes the job and gets the shared
        prefix copied in (see _share_prefix).
        """
        best = max(free, key=lambda s: (s.shared_with(job), -s.last_used))
        kept = best.shared_with(job)
        if kept >= len(job.tokens) - 1 or len(best.tokens) - kept <= SLACK or len(free) == 1:
            return best  # a repeat, a follow-up turn, or no choice
        return min((s for s in free if s is not best), key=lambda s: (bool(s.tokens), s.last_used))

    def _begin_or_await(self, slot: Slot, job: Job) -> None:
        """Start the job in the slot, or have it wait for a prompt that starts alike."""
        if job.embed:
            self._start(slot, job)
            return
        slot.awaiting = self._prefix_to_await(slot, job)
        if slot.awaiting is None:
            self._share_prefix(slot, job)
            self._start(slot, job)

    def _prefix_to_await(self, slot: Slot, job: Job) -> Awaiting | None:
        """Another slot's prompt, still being decoded, that starts like this one for
        MIN_SHARED tokens more than any cache holds now: worth waiting for.

        So requests arriving together with the same system prompt or document
        evaluate it once, not once each side by side.
        """
        caches = [*self.slots, *([self.keeper] if self.keeper is not None else [])]
        held = max(s.shared_with(job) for s in caches)
        best: Awaiting | None = None
        for s in self.slots:
            if s is slot or s.job is None or s.leader is not None or s.job.embed:
                continue
            if s.awaiting is not None or not s.prompting:
                continue
            coming = reusable(s.tokens + s.pending, s.job.scope, s.job.public, job)
            until = min(coming, len(job.tokens) - 1)
            if until >= held + MIN_SHARED and (best is None or until > best.until):
                best = Awaiting(s, s.job, until)
        return best

    def _end_waits(self) -> None:
        """Start each awaiting job whose donor has decoded the shared prefix, or left
        (then the job may wait for another that started since)."""
        for slot in self.slots:
            if slot.awaiting is None or not slot.awaiting.over:
                continue
            assert slot.job is not None
            try:
                self._begin_or_await(slot, slot.job)
            except Exception as exc:
                self._fail(slot, f"could not start generating: {exc}", exc)

    def _share_prefix(self, slot: Slot, job: Job) -> None:
        """Copy in the cache of another slot, busy or not, or the keeper's, that holds
        more of the prompt and can continue it.

        So a system prompt or a document many requests share is evaluated once
        per worker, not once per slot.
        """
        assert self.ctx is not None
        last = len(job.tokens) - 1  # the last prompt token is always evaluated again
        held = min(slot.shared_with(job), last)
        # what it holds past its window is evaluated again by _start
        own = held if self.ctx.reusable(slot.seq, held) else 0
        donors = [
            (s.shared_with(job), s)
            for s in self.slots
            if s is not slot and s.leader is None and s.tokens
        ]
        # a prefix seen before: in another slot, or in this one where it is lost
        seen = max([held - own, *(n for n, _ in donors)])
        self._plan_keep(slot, job, min(seen, last))
        if self.keeper is not None and self.keeper.tokens:
            donors.append((self.keeper.shared_with(job), self.keeper))
        for n, donor in sorted(donors, key=lambda d: -d[0]):
            shared = min(n, last)
            if shared < own + MIN_SHARED:
                return
            if self.ctx.reusable(donor.seq, shared):
                self.ctx.copy_seq(donor.seq, slot.seq)
                slot.tokens = list(donor.tokens)
                slot.scope, slot.public = donor.scope, donor.public  # _start keeps what it may
                return

    def _plan_keep(self, slot: Slot, job: Job, shared: int) -> None:
        """A prompt that starts like an earlier one for KEEP_MIN tokens or more: the
        keeper gets that prefix once this slot has decoded it, unless it holds it."""
        slot.keep_at = 0
        if self.keeper is None or shared < KEEP_MIN:
            return
        if self.keeper.shared_with(job) < shared:
            slot.keep_at = shared

    def _keep(self, slot: Slot) -> None:
        """Copy the slot's planned prefix into the keeper, if it has been decoded: its
        sliding-window cells are all still cached just after."""
        if self.keeper is None or not 0 < slot.keep_at <= len(slot.tokens):
            return
        assert self.ctx is not None
        self.ctx.copy_seq(slot.seq, self.keeper.seq)
        self.ctx.clear_from(self.keeper.seq, slot.keep_at)
        self.keeper.tokens = slot.tokens[: slot.keep_at]
        self.keeper.scope, self.keeper.public = slot.scope, slot.public
        slot.keep_at = 0

    def _start(self, slot: Slot, job: Job) -> None:
        assert self.ctx is not None and self.model is not None
        # Keep the longest cached prefix, but always re-evaluate the last
        # prompt token: its logits are what the first sampled token needs.
        # An embedding pools all its tokens, so it keeps nothing.
        keep = 0 if job.embed else min(slot.shared_with(job), len(job.tokens) - 1)
        if keep < len(slot.tokens) and not self.ctx.clear_from(slot.seq, keep):
            self.ctx.clear_from(slot.seq, 0)
            keep = 0
        if not self.ctx.reusable(slot.seq, keep):  # the window before it is gone
            self.ctx.clear_from(slot.seq, 0)
            keep = 0
        del slot.tokens[keep:]
        slot.scope, slot.public = job.scope, job.public
        if not job.embed:
            slot.sampler = build_sampler(self.model, job.sampling, self.ctx.n_ctx_seq)
            slot.constraint = _constraint(job)
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.stops = StopMatcher(job.stop)
        slot.pending = job.tokens[keep:]
        slot.drafter = None if job.embed else self._drafter()
        job.cache_n = keep
        job.t_start = time.perf_counter()
        self._keep(slot)

    def _drafter(self) -> Drafter | None:
        """A request's drafter, when the assistant speculates."""
        return Drafter() if self.assistant.speculate == "ngram" else None

    def _start_follower(self, slot: Slot, job: Job, leader: Slot) -> None:
        """Another choice of the leader's request: it waits for the leader's prompt."""
        assert self.ctx is not None and self.model is not None
        slot.sampler = build_sampler(self.model, job.sampling, self.ctx.n_ctx_seq)
        slot.constraint = _constraint(job)
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.stops = StopMatcher(job.stop)
        slot.pending = []
        slot.drafter = self._drafter()
        slot.leader = leader
        job.t_start = time.perf_counter()

    def _fork(self, leader: Slot, index: int) -> None:
        """The leader's prompt is decoded: give its KV cache to each follower and sample it."""
        assert self.ctx is not None and leader.job is not None
        for slot in self.slots:
            if slot.leader is not leader or slot.job is None:
                continue
            slot.leader = None
            self.ctx.clear_from(slot.seq, 0)
            self.ctx.copy_seq(leader.seq, slot.seq)
            slot.tokens = list(leader.tokens)
            slot.scope, slot.public = leader.scope, leader.public
            slot.job.cache_n = leader.job.cache_n
            self._sample_or_fail(slot, index)

    def _decode_step(self) -> None:
        """Decode one batch: each generating slot's next token, then prompt chunks.

        If llama_decode refuses the batch, each slot's part is decoded on its
        own, so only a request whose own tokens fail is failed.
        """
        assert self.ctx is not None
        self._end_waits()
        budget = self.ctx.n_batch
        plan: list[tuple[Slot, list[int]]] = []
        active = [
            s for s in self.slots if s.job is not None and s.leader is None and s.awaiting is None
        ]
        active.sort(key=lambda s: s.prompting)
        # While other sequences are generating, a prompt goes in smaller chunks:
        # each step gives every one of them its next token, so a long prompt
        # arriving stalls them for a short step at a time, not a long one.
        generating = sum(not s.prompting for s in active)
        # Draft tokens in one step, all slots together: each one's logits take a
        # row of n_vocab floats (llama.cpp keeps the largest buffer it needed).
        # A few while a long prompt is decoded: they add little to its long steps
        # and may give a generating sequence several tokens in one instead of one.
        # None beside a short prompt, whose step they would lengthen much more.
        # None beyond a few generating sequences: their step is long already,
        # and ends only when the slowest of them is done.
        prompting = any(s.prompting for s in active)
        long_prompt = any(s.prompting and len(s.pending) >= PREFILL_CHUNK for s in active)
        drafts = MAX_DRAFT if not prompting else PROMPTING_DRAFT if long_prompt else 0
        if generating > MAX_DRAFTING:
            drafts = 0
        for slot in active:
            if slot.prompting and generating:
                budget = min(budget, PREFILL_CHUNK)
            if budget <= 0:
                break
            assert slot.job is not None
            if slot.job.embed and len(slot.pending) > budget:
                continue  # an embedding input is decoded whole, in a later batch
            if slot.drafted > min(budget - 1, drafts):  # cut short, never split
                slot.drafted = max(0, min(budget - 1, drafts))
                del slot.pending[1 + slot.drafted :]
            drafts -= slot.drafted
            take = slot.pending[:budget]
            plan.append((slot, take))
            budget -= len(take)
        entries = [e for slot, take in plan for e in self._entries(slot, take)]
        hand_over()  # the last step's events go out while this one decodes
        status = self.ctx.decode(entries)
        if status == 0:
            self._advance(plan)
            return
        log.warning(
            "llama_decode failed with status %d on assistant %s; decoding each request apart",
            status,
            self.name,
        )
        for slot, take in plan:
            self.ctx.clear_from(slot.seq, len(slot.tokens))
            status = self.ctx.decode(self._entries(slot, take))
            if status == 0:
                self._advance([(slot, take)])
            else:
                self.ctx.clear_from(slot.seq, 0)
                slot.tokens.clear()
                self._fail(slot, f"the model failed to decode this request (status {status})")

    @staticmethod
    def _entries(slot: Slot, take: list[int]) -> list[tuple[int, int, int, bool]]:
        """Batch entries for a slot's next tokens; logits only after its last pending one."""
        base = len(slot.tokens)
        last = len(take) == len(slot.pending)
        # pooling reads every token's output; a draft is checked at every token
        every = slot.drafted > 0 or (slot.job is not None and slot.job.embed)
        return [
            (token, base + i, slot.seq, every or (last and i == len(take) - 1))
            for i, token in enumerate(take)
        ]

    def _advance(self, plan: list[tuple[Slot, list[int]]]) -> None:
        """Record a decoded batch, then sample every slot whose prompt is done."""
        index = -1
        for slot, take in plan:
            index += len(take)
            done = len(take) == len(slot.pending)
            drafted, slot.drafted = slot.drafted, 0
            slot.tokens.extend(take)
            del slot.pending[: len(take)]
            self._keep(slot)
            if done and slot.job is not None and slot.job.followers:
                self._fork(slot, index)
            if done and slot.job is not None and slot.job.embed:
                try:
                    self._embed(slot)
                except Exception as exc:
                    self._fail(slot, f"embedding failed: {exc}", exc)
            elif done:
                self._sample_or_fail(slot, index, drafted)

    def _sample_or_fail(self, slot: Slot, index: int, drafted: int = 0) -> None:
        """:meth:`_sample`, failing the slot's request alone if it cannot be sampled."""
        try:
            self._sample(slot, index, drafted)
        except NoTokenAllowed as exc:
            assert slot.constraint is not None and slot.job is not None
            log.info("assistant %s: a request ended: %s", self.name, exc)
            error = InvalidRequest(f"'{slot.constraint.param}': {exc}", param=slot.constraint.param)
            slot.job.emit(Failed(str(exc), error=error))
            self._finish(slot, None)
        except Exception as exc:
            self._fail(slot, f"sampling failed: {exc}", exc)

    def _embed(self, slot: Slot) -> None:
        """Report the pooled embedding and end the job; the sequence is not kept."""
        assert self.ctx is not None and slot.job is not None
        slot.job.t_first = time.perf_counter()
        slot.job.emit(Embedded(self.ctx.embedding(slot.seq)))
        self._finish(slot, "stop")
        self.ctx.clear_from(slot.seq, 0)
        slot.tokens.clear()

    def _sample(self, slot: Slot, index: int, drafted: int = 0) -> None:
        """Sample the slot's next token from the batch output at ``index``.

        With a draft (the slot's last ``drafted`` tokens, decoded at the outputs
        before ``index``), sample position by position from the first: each
        draft token the sampler picks itself is kept, the first it does not is
        replaced by the sampler's token, and the cache forgets the rest.
        """
        assert self.ctx is not None
        job = slot.job
        assert job is not None
        draft = slot.tokens[len(slot.tokens) - drafted :]
        accepted = 0
        job.draft_n += drafted  # counted before a token is reported: it may end the job
        for i in range(drafted + 1):
            assert slot.sampler is not None
            at = index - drafted + i
            # logprobs are the model's own, from the logits before the grammar's mask
            distribution = (
                log_softmax(self.ctx.logits(at)) if job.top_logprobs is not None else None
            )
            if slot.constraint is not None:
                slot.constraint.mask(self.ctx.logits(at))
            token = self.ctx.sample(slot.sampler, at)
            matched = i < drafted and token == draft[i]
            accepted += matched
            job.draft_accepted += matched
            self._report(slot, token, distribution)
            if not matched or slot.job is not job:
                break
        if accepted < drafted:  # the rest of the draft was decoded for nothing
            cut = len(slot.tokens) - (drafted - accepted)
            self.ctx.clear_from(slot.seq, cut)
            del slot.tokens[cut:]
        if slot.drafter is not None:
            slot.drafter.record(drafted, accepted)
        if slot.job is not job:
            return  # that token ended the request
        slot.pending = [token]
        drafter = slot.drafter
        others = self._generating_besides(slot)
        # beyond MAX_DRAFTING generating, _decode_step would drop the draft anyway
        if drafter is not None and others < MAX_DRAFTING and (drafter.reliable or not others):
            # the draft must not end the context earlier than its tokens would
            room = min(
                job.max_tokens - job.n_generated - 1, self.ctx.n_ctx_seq - len(slot.tokens) - 3
            )
            slot.pending += drafter.propose([*slot.tokens, token], room)
            slot.drafted = len(slot.pending) - 1

    def _generating_besides(self, slot: Slot) -> int:
        """Other sequences decoding their next tokens in the same steps (then a draft's
        tokens cost the batch more than the steps they might save)."""
        return sum(
            s is not slot and s.job is not None and s.job.n_generated > 0 for s in self.slots
        )

    def _report(self, slot: Slot, token: int, distribution: npt.NDArray[np.float64] | None) -> None:
        """Report a sampled token, with the log-probabilities it was drawn from if asked
        (the slot's job is over if it ended it)."""
        assert self.ctx is not None and self.model is not None
        job = slot.job
        assert job is not None and slot.stops is not None
        if job.n_generated == 0:
            job.t_first = time.perf_counter()
        job.n_generated += 1
        if self.model.is_eog(token):
            self._finish(slot, "stop")
            return
        piece = self.model.piece(token)
        if slot.constraint is not None:
            slot.constraint.accept(token, piece.decode("utf-8", "replace"))
        text = slot.stops.feed(slot.decoder.decode(piece))
        if distribution is not None:
            assert job.top_logprobs is not None
            job.emit(Delta(text, [entry(self.model, distribution, token, job.top_logprobs)]))
        elif text:
            job.emit(Delta(text))
        if slot.stops.stopped or (slot.constraint is not None and slot.constraint.finished):
            self._finish(slot, "stop")
        elif job.n_generated >= job.max_tokens or len(slot.tokens) + 1 >= self.ctx.n_ctx_seq:
            self._finish(slot, "length")

    def _fail(self, slot: Slot, message: str, exc: Exception | None = None) -> None:
        """Fail the slot's request alone; the others keep generating."""
        if exc is not None:
            log.error("assistant %s: a request failed: %s", self.name, message, exc_info=exc)
        else:
            log.error("assistant %s: a request failed: %s", self.name, message)
        assert slot.job is not None
        slot.job.emit(Failed(message))
        self._finish(slot, None)

    def _finish(self, slot: Slot, reason: FinishReason | None) -> None:
        """End the slot's job; reason None means cancelled or failed (nothing more sent)."""
        job = slot.job
        assert job is not None
        if reason is not None:
            assert slot.stops is not None
            tail = slot.decoder.decode(b"", final=True) if not slot.stops.stopped else ""
            tail = slot.stops.feed(tail) + ("" if slot.stops.stopped else slot.stops.flush())
            if tail:
                job.emit(Delta(tail))
            if job.n_generated == 0:
                job.t_first = time.perf_counter()
            timings = job.timings()
            job.emit(
                Finished(
                    finish_reason=reason,
                    prompt_tokens=len(job.tokens),
                    completion_tokens=job.n_generated,
                    timings=timings,
                    stop_word=slot.stops.matched,
                )
            )
            self.requests_served += 1
            self.last_prompt_per_second = timings.prompt_per_second
            self.last_predicted_per_second = timings.predicted_per_second
        self.tokens_generated += job.n_generated
        for follower in self.slots:
            if follower.leader is slot and follower.job is not None:
                # the shared prompt was never decoded: the leader failed or was
                # cancelled, which ends the whole request, so the followers just end
                follower.leader = None
                self._finish(follower, None)
        if slot.sampler is not None:
            free_sampler(slot.sampler)
        slot.sampler = None
        slot.constraint = None
        slot.job = None
        slot.pending = []
        slot.drafted = 0
        slot.drafter = None
        slot.awaiting = None
        slot.keep_at = 0
        slot.last_used = time.perf_counter()
