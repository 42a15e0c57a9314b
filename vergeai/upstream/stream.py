"""One request to a remote assistant: streamed from a replica, chunk by chunk, into job events.

The upstream is always asked to stream (and to report usage), whether or
not the client streams, so that a client gone closes the upstream request
and an answer is passed on without being buffered. A failure before the
first piece of the answer was passed on is retried once on another replica;
after it, the client gets the error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from vergeai.errors import Unavailable, UpstreamFailed, UpstreamRefused, VergeError
from vergeai.runtime.job import Delta, Failed, Finished, FinishReason, Job, Timings
from vergeai.runtime.toolcalls import CallDelta
from vergeai.upstream.replicas import Remote, Replica, describe

log = logging.getLogger("vergeai.upstream")

MAX_ERROR_BODY = 64 * 1024
MAX_EVENT = 16 * 1024 * 1024
# An answer is held to the request's max_tokens whatever the upstream sends: at most
# that many pieces (an upstream streams about a token a piece), and that many times
# this many characters, for an upstream that sends its text in a few large pieces.
CHARS_PER_TOKEN = 32
MAX_PROMPT = 100_000_000  # prompt tokens an upstream may report for one request
ATTEMPTS = 2  # the first replica, then one other


class Failure(Exception):
    """A failed attempt: whether another replica may be tried, whether this one is ejected."""

    def __init__(
        self,
        reason: str,
        retry: bool = True,
        eject: bool = True,
        stale: bool = False,
        error: VergeError | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.eject = eject
        # the upstream had closed the kept-alive connection it was sent on (llama-server
        # does, now and then): nothing is wrong with the upstream
        self.stale = stale
        self.error = error  # what the client gets, when the failure says more than its reason


@dataclass(eq=False)
class RemoteJob(Job):
    """A request's choices as one upstream request; the task reports on the job's queue."""

    body: dict[str, Any] = field(default_factory=dict)
    session: tuple[str, str] | None = None  # (user, session id): the replica it sticks to
    prompt_estimate: int = 0  # until the upstream reports its count
    choices: int = 1  # n: the upstream answers them all in one stream
    hold: bool = False  # the client takes the answer whole: keep it until it is, so retry
    task: asyncio.Task[None] | None = None

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
            self.emit_as(0, _failed(failure))
        except VergeError as exc:  # no replica to try
            self.emit_as(0, Failed(exc.message, error=exc))
        except Exception as exc:  # a bug here must still end the request
            log.exception("assistant %s: the upstream request failed", remote.name)
            self.emit_as(0, Failed(f"the upstream request failed: {type(exc).__name__}"))


def _failed(failure: Failure) -> Failed:
    error = failure.error
    if error is None and failure.eject:  # the replicas are down: worth retrying later
        error = Unavailable(
            f"no upstream server could answer ({failure.reason}); try again shortly",
            retry_after=2,
        )
    if error is None:
        error = UpstreamFailed(f"the upstream server failed the request: {failure.reason}")
    return Failed(error.message, error=error)


@dataclass
class Progress:
    """What an attempt has read and passed on so far."""

    n: int
    held: list[tuple[int, Delta]] = field(default_factory=list)  # kept back for a whole answer
    finish: dict[int, FinishReason] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    chunks: int = 0  # pieces read: the completion tokens if the upstream gives no usage
    pieces: dict[int, int] = field(default_factory=dict)  # per choice
    chars: dict[int, int] = field(default_factory=dict)  # per choice
    cut: bool = False  # a choice ran past max_tokens and was ended here

    @property
    def passed(self) -> bool:
        """Something went to the client: no retry any more."""
        return self.chunks > len(self.held)

    @property
    def complete(self) -> bool:
        """Every choice has ended: nothing more is read."""
        return len(self.finish) >= self.n


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
    async with aclosing(_chunks(remote, replica, job.body)) as chunks:
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
    completion = _count(usage.get("completion_tokens"), progress.chunks,
                        job.max_tokens * job.choices, "completion_tokens", remote)  # fmt: skip
    prompt = _count(usage.get("prompt_tokens"), job.prompt_estimate, MAX_PROMPT, "prompt_tokens",
                    remote)  # fmt: skip
    job.n_generated = completion
    timings = _timings(job, progress, prompt, completion)
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
        text = _text(delta.get("content"))
        reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
        calls = _calls(delta.get("tool_calls"))
        text, reasoning, calls = _within(job, progress, index, text, reasoning, calls)
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


def _within(
    job: Job,
    progress: Progress,
    index: int,
    text: str,
    reasoning: str,
    calls: tuple[CallDelta, ...],
) -> tuple[str, str, tuple[CallDelta, ...]]:
    """A choice's new output, cut where it passes max_tokens (the choice then ends)."""
    if not (text or reasoning or calls):
        return text, reasoning, calls
    pieces = progress.pieces[index] = progress.pieces.get(index, 0) + 1
    room = job.max_tokens * CHARS_PER_TOKEN - progress.chars.get(index, 0)
    size = len(text) + len(reasoning) + sum(len(c.arguments) for c in calls)
    progress.chars[index] = progress.chars.get(index, 0) + size
    if pieces > job.max_tokens:
        text, reasoning, calls = "", "", ()
    elif size > room:
        reasoning = reasoning[:room]
        text = text[: room - len(reasoning)]
        calls = ()
    else:
        return text, reasoning, calls
    progress.finish[index] = "length"
    progress.cut = True
    return text, reasoning, calls


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any, fallback: int, most: int, name: str, remote: Remote) -> int:
    """An upstream's token count, within 0..most (a number out of it is logged)."""
    count = _int(value, fallback)
    if 0 <= count <= most:
        return count
    log.warning("assistant %s: the upstream reported %s %s; counted as %d",
                remote.name, name, str(count)[:40], min(max(count, 0), most))  # fmt: skip
    return min(max(count, 0), most)


def _int(value: Any, fallback: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else fallback


def _calls(value: Any) -> tuple[CallDelta, ...]:
    if not isinstance(value, list):
        return ()
    calls = []
    for item in value:
        if not isinstance(item, dict):
            continue
        function = item.get("function") or {}
        calls.append(
            CallDelta(
                index=_int(item.get("index"), 0),
                arguments=_text(function.get("arguments")),
                id=item.get("id") if isinstance(item.get("id"), str) else None,
                name=function.get("name") if isinstance(function.get("name"), str) else None,
            )
        )
    return tuple(calls)


def _timings(job: RemoteJob, progress: Progress, prompt: int, completion: int) -> Timings:
    """The upstream's timings when it sends them (llama-server, vergeai), else measured here."""
    t = progress.timings or {}
    end = time.perf_counter()
    first = job.t_first or end
    cached = ((progress.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    cache_n = _int(t.get("cache_n"), _int(cached, 0))
    return Timings(
        cache_n=cache_n,
        prompt_n=_int(t.get("prompt_n"), max(0, prompt - cache_n)),
        prompt_ms=_float(t.get("prompt_ms"), (first - job.t_start) * 1000.0),
        predicted_n=_int(t.get("predicted_n"), completion),
        predicted_ms=_float(t.get("predicted_ms"), (end - first) * 1000.0),
        draft_n=_int(t.get("draft_n"), 0),
        draft_n_accepted=_int(t.get("draft_n_accepted"), 0),
    )


def _float(value: Any, fallback: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return fallback


async def _chunks(
    remote: Remote, replica: Replica, body: dict[str, Any]
) -> AsyncGenerator[Any, None]:
    """The upstream's SSE events, parsed; a :class:`Failure` for whatever goes wrong."""
    url = replica.base + "/v1/chat/completions"
    answered = False
    try:
        async with remote.http().stream("POST", url, json=body, headers=remote.headers()) as r:
            answered = True
            if r.status_code != 200:
                raise await _refusal(r)
            done = False
            async for data in _events(r):
                if done:  # read to the end, so that the connection is kept for the next
                    continue
                if data == b"[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise Failure("a malformed event in the answer", eject=False) from None
                if not isinstance(chunk, dict):
                    raise Failure("a malformed event in the answer", eject=False)
                if "error" in chunk:
                    raise _mid_stream_error(chunk["error"])
                yield chunk
            if done:
                return
    except httpx.HTTPError as exc:
        stale = not answered and isinstance(exc, httpx.RemoteProtocolError)
        raise Failure(describe(exc), stale=stale) from None
    raise Failure("the answer ended without [DONE]")


async def _events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The data of each SSE ``data:`` line, split from the bytes as they come."""
    pending = b""
    async for part in response.aiter_bytes():
        lines = (pending + part).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_EVENT:
            raise Failure("an event in the answer is over 16 MiB", eject=False)
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()


# what looks like a credential in an upstream's error text (an upstream may echo the
# request's Authorization header): never passed to the client or the log
CREDENTIAL = re.compile(
    r"(?i)(bearer\s+|authorization[\"']?\s*[:=]\s*[\"']?(bearer\s+)?|"
    r"(api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"
    r"|\b(sk|vai|hf|ghp|xox[bap])[-_][A-Za-z0-9_\-]{8,}"
)


def scrub(text: str) -> str:
    """The text with anything that looks like a key or token replaced."""
    return CREDENTIAL.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def _message(body: bytes) -> str:
    """The error message of an upstream's error body (or the start of the body), scrubbed."""
    return scrub(_raw_message(body))


def _raw_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip()
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:2000]
    if isinstance(error, str):
        return error[:2000]
    if isinstance(data, dict) and isinstance(data.get("message"), str):  # vLLM's own shape
        return str(data["message"])[:2000]
    return body[:300].decode("utf-8", "replace").strip()


async def _refusal(response: httpx.Response) -> Failure:
    body = b""
    async for part in response.aiter_bytes():
        body += part
        if len(body) > MAX_ERROR_BODY:
            break
    status = response.status_code
    message = _message(body)
    if 300 <= status < 400:  # httpx follows no redirect: the URL is wrong for its API
        moved = UpstreamFailed(
            f"the upstream server answered with a redirect (HTTP {status}); an admin should "
            "check the assistant's upstream URL"
        )
        return Failure(f"answered HTTP {status}", retry=False, eject=False, error=moved)
    if status >= 500:
        return Failure(f"answered HTTP {status}: {message}")
    if status == 429:
        return Failure(f"answered HTTP 429: {message}", eject=False)
    error: VergeError
    if status in (401, 403):
        error = UpstreamFailed(
            f"the upstream server refused vergeai's key (HTTP {status}); an admin should check "
            "the assistant's upstream_key_env"
        )
    else:
        error = UpstreamRefused(
            f"the upstream server refused the request: {message}", status=status
        )
    return Failure(f"answered HTTP {status}: {message}", retry=False, eject=False, error=error)


def _mid_stream_error(error: Any) -> Failure:
    message = error.get("message") if isinstance(error, dict) else error
    text = scrub(str(message)[:2000])
    error = UpstreamFailed(f"the upstream server failed the answer: {text}")
    return Failure(f"an error in the answer: {text}", eject=False, error=error)
