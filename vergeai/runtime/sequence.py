"""One job's run in a slot: its sampler, grammar, text decoder, stop strings and drafter.

Thread rule: built, used and closed by the model worker's thread only (the
sampler chain and the context it samples from are native).
"""

from __future__ import annotations

import codecs
import time

import numpy as np
import numpy.typing as npt

from vergeai.runtime.constraint import Constraint
from vergeai.runtime.context import Context
from vergeai.runtime.job import Delta, Finished, FinishReason, Job, Timings
from vergeai.runtime.llama import Model
from vergeai.runtime.logprobs import entry, log_softmax
from vergeai.runtime.sampler import Sampler, build_sampler, free_sampler
from vergeai.runtime.speculate import Drafter
from vergeai.runtime.stops import StopMatcher


class Sequence:
    def __init__(self, job: Job, model: Model, n_ctx_seq: int, speculate: bool) -> None:
        self.job = job
        self.model = model
        self.n_ctx_seq = n_ctx_seq
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.constraint: Constraint | None = None
        self.sampler: Sampler | None = None
        self.drafter: Drafter | None = None
        self.top_logprobs: int | None = None
        self.max_tokens = 0
        gen = job.generate
        self.stops = StopMatcher(gen.stop if gen is not None else [])
        if gen is None:
            return  # an embedding: nothing to sample, only its end to report
        grammar = gen.sampling.grammar
        self.constraint = grammar.start() if grammar is not None else None
        self.sampler = build_sampler(model, gen.sampling, n_ctx_seq)
        self.drafter = Drafter() if speculate else None
        self.top_logprobs = gen.top_logprobs
        self.max_tokens = gen.max_tokens

    def sample(self, ctx: Context, at: int) -> tuple[int, npt.NDArray[np.float64] | None]:
        """The next token from batch output ``at``, and the distribution it came from if
        log-probabilities are asked for (the model's own, before the grammar's mask)."""
        assert self.sampler is not None
        logprobs = log_softmax(ctx.logits(at)) if self.top_logprobs is not None else None
        if self.constraint is not None:
            self.constraint.mask(ctx.logits(at))
        return ctx.sample(self.sampler, at), logprobs

    def report(
        self, token: int, distribution: npt.NDArray[np.float64] | None, cached: int
    ) -> FinishReason | None:
        """Report a sampled token (its slot caches ``cached`` tokens); why the job ends
        with it, if it does."""
        job = self.job
        if job.n_generated == 0:
            job.t_first = time.perf_counter()
        job.n_generated += 1
        if self.model.is_eog(token):
            return "stop"
        piece = self.model.piece(token)
        if self.constraint is not None:
            self.constraint.accept(token, piece.decode("utf-8", "replace"))
        text = self.stops.feed(self.decoder.decode(piece))
        if distribution is not None:
            assert self.top_logprobs is not None
            job.emit(Delta(text, [entry(self.model, distribution, token, self.top_logprobs)]))
        elif text:
            job.emit(Delta(text))
        if self.stops.stopped or (self.constraint is not None and self.constraint.finished):
            return "stop"
        if job.n_generated >= self.max_tokens or cached + 1 >= self.n_ctx_seq:
            return "length"
        return None

    def finish(self, reason: FinishReason) -> Timings:
        """Send the rest of the text and the job's end; its timings."""
        job, stops = self.job, self.stops
        tail = self.decoder.decode(b"", final=True) if not stops.stopped else ""
        tail = stops.feed(tail) + ("" if stops.stopped else stops.flush())
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
                stop_word=stops.matched,
            )
        )
        return timings

    def close(self) -> None:
        if self.sampler is not None:
            free_sampler(self.sampler)
            self.sampler = None
