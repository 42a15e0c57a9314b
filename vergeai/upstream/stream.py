"""One request to a remote assistant: streamed from a replica, chunk by chunk, into job events.

The upstream is always asked to stream (and to report usage), whether or
not the client streams, so that a client gone closes the upstream request
and an answer is passed on without being buffered. A failure before the
first piece of the answer was passed on is retried once on another replica;
after it, the client gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from vergeai.errors import VergeError
from vergeai.runtime.job import Delta, Failed, Finished, Task
from vergeai.upstream.failure import Failure, failed
from vergeai.upstream.progress import (
    MAX_PROMPT,
    Progress,
    answer_timings,
    call_deltas,
    text_of,
    token_count,
    within,
)
from vergeai.upstream.replicas import Remote, Replica
from vergeai.upstream.sse import answer_chunks

log = logging.getLogger("vergeai.upstream")

ATTEMPTS = 2  # the first replica, then one other


@dataclass(kw_only=True, eq=False)
class RemoteJob(Task):
    """A request's choices as one upstream request; the task reports on the job's queue."""

    max_tokens: int  # per choice: the upstream's output is held to it
    body: dict[str, Any] = field(default_factory=dict)
    session: tuple[str, str] | None = None  # (user, session id): the replica it sticks to
    prompt_estimate: int = 0  # until the upstream reports its count
    choices: int = 1  # n: the upstream answers them all in one stream
    hold: bool = False  # the client takes the answer whole: keep it until it is, so retry
    task: asyncio.Task[None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_estimate  # until the upstream reports its count

    def emit(self, event: Any) -> None:  # on the event loop already
        self.emit_as(self.choice, event)

    def emit_as(self, index: int, event: Any) -> None:
        self.queue.put_nowait((index, event))

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.task.cancel()  # closes the upstream request

    def run(self, remote: Remote) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(remote))

    async def _run(self, remote: Remote) -> None:
        try:
            await _attempts(self, remote)
        except Failure as failure:
            self.emit_as(0, failed(failure))
        except VergeError as exc:  # no replica to try
            self.emit_as(0, Failed(exc.message, error=exc))
        except Exception as exc:  # a bug here must still end the request
            log.exception("assistant %s: the upstream request failed", remote.name)
            self.emit_as(0, Failed(f"the upstream request failed: {type(exc).__name__}"))


async def _attempts(job: RemoteJob, remote: Remote) -> None:
    tried: list[Replica] = []
    while True:
        replica = remote.pick(job.session, tried)
        tried.append(replica)
        progress = Progress(job.choices)
        replica.in_flight += 1
        replica.requests += 1
        try:
            try:
                await _attempt(job, remote, replica, progress)
            except Failure as failure:
                if not failure.stale:
                    raise
                progress = Progress(job.choices)  # once more, on a new connection
                await _attempt(job, remote, replica, progress)
            remote.requests_served += 1
            return
        except Failure as failure:
            if failure.eject:
                remote.failed(replica, failure.reason)
            else:
                replica.last_error = failure.reason
            if progress.passed or not failure.retry or len(tried) >= ATTEMPTS:
                raise
            log.info("assistant %s: retrying on another upstream after %s: %s",
                     remote.name, replica.url, failure.reason)  # fmt: skip
        finally:
            replica.in_flight -= 1


async def _attempt(job: RemoteJob, remote: Remote, replica: Replica, progress: Progress) -> None:
    job.t_start = time.perf_counter()
    async with aclosing(answer_chunks(remote, replica, job.body)) as chunks:
        async for chunk in chunks:
            if not progress.chunks:
                replica.last_latency = time.perf_counter() - job.t_start
            _read(job, chunk, progress)
            if progress.cut and progress.complete:
                break  # an upstream past max_tokens: its request is closed
    if progress.cut:
        log.warning("assistant %s: upstream %s sent more than max_tokens %d; the answer was cut",
                    remote.name, replica.url, job.max_tokens)  # fmt: skip
    if len(progress.finish) < progress.n:
        raise Failure("the answer ended without a finish reason")
    replica.healthy()
    job.t_first = job.t_first or time.perf_counter()  # an empty answer
    usage = progress.usage or {}
    # an upstream's counts go into limits, quotas and the usage record: held to what
    # the request could have used (its answer is held to max_tokens too)
    completion = token_count(
        usage.get("completion_tokens"), progress.chunks, job.max_tokens * job.choices,
        "completion_tokens", remote,
    )  # fmt: skip
    prompt = token_count(
        usage.get("prompt_tokens"), job.prompt_estimate, MAX_PROMPT, "prompt_tokens", remote
    )
    job.n_generated = completion
    timings = answer_timings(job, progress, prompt, completion)
    for index, delta in progress.held:
        job.emit_as(index, delta)
    for index in range(progress.n):
        first = index == 0  # the request's counts go with its first choice
        job.emit_as(
            index,
            Finished(
                finish_reason=progress.finish[index],
                prompt_tokens=prompt if first else 0,
                completion_tokens=completion if first else 0,
                timings=timings,
            ),
        )


def _read(job: RemoteJob, chunk: dict[str, Any], progress: Progress) -> None:
    if isinstance(chunk.get("usage"), dict):
        progress.usage = chunk["usage"]
    if isinstance(chunk.get("timings"), dict):
        progress.timings = chunk["timings"]
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < progress.n:
            raise Failure(f"an answer for choice {index!r}, not asked for", eject=False)
        if index in progress.finish:
            continue  # ended: by its finish reason, or here at max_tokens
        delta = choice.get("delta") or {}
        text = text_of(delta.get("content"))
        reasoning = text_of(delta.get("reasoning_content")) or text_of(delta.get("reasoning"))
        calls = call_deltas(delta.get("tool_calls"))
        text, reasoning, calls = within(job.max_tokens, progress, index, text, reasoning, calls)
        logprobs = (choice.get("logprobs") or {}).get("content") or None
        if text or reasoning or calls or logprobs:
            if not progress.chunks:
                job.t_first = time.perf_counter()
            progress.chunks += 1
            job.n_generated = progress.chunks  # counted against limits as it comes
            delta = Delta(text, logprobs, reasoning, calls)
            if job.hold:
                progress.held.append((index, delta))
            else:
                job.emit_as(index, delta)
        reason = choice.get("finish_reason")
        if reason:
            progress.finish[index] = "length" if reason == "length" else "stop"
