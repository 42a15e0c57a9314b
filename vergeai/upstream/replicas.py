"""One remote assistant's upstream servers: routing, ejection with backoff, health checks.

A :class:`Remote` stands where a local :class:`~vergeai.runtime.worker.Worker`
would, for the pool, the workers view, /health and /metrics. Requests go to
the healthy replica with the fewest in flight (a chat-history session sticks
to the replica that served it while that one is healthy). A replica whose
request is refused, times out or answers 5xx is ejected for a time that
doubles with each failure in a row (1 s to 60 s); the health thread checks
every replica each ``health_interval`` seconds and takes back one that
passes once its time is out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from vergeai.errors import Unavailable
from vergeai.runtime.engine import WorkerState
from vergeai.state.assistants import Assistant
from vergeai.upstream.secrets import upstream_key

if TYPE_CHECKING:
    from vergeai.runtime.job import Task

log = logging.getLogger("vergeai.upstream")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
PROBE_TIMEOUT = 5.0
MAX_SESSIONS = 10_000  # remembered session → replica pairs


class ReplicaState(StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"  # failed a request; not used until its backoff has passed
    DOWN = "down"  # failed its health check; not used until one passes
    PROBING = "probing"  # not known to be healthy yet: checked at the next chance


def base_of(url: str) -> str:
    """The server's root: the URL without a trailing slash or ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class Replica:
    url: str  # as configured
    state: ReplicaState = ReplicaState.PROBING
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    in_a_row: int = 0  # failures since it was last healthy: the backoff grows with them
    ejected_until: float = 0.0
    last_latency: float | None = None  # seconds to the first byte of its last answer
    last_error: str = ""
    checked: bool = False  # a health check or a request has told its state

    @property
    def base(self) -> str:
        return base_of(self.url)

    def healthy(self) -> None:
        self.state = ReplicaState.HEALTHY
        self.in_a_row = 0
        self.checked = True

    def eject(self, error: str) -> float | None:
        """Out for a while, longer each time in a row; the seconds it stays out.

        None when it is out already: the requests that were in flight when
        it went down fail together, and count as one failure.
        """
        self.failures += 1
        self.last_error = error
        self.checked = True
        now = time.monotonic()
        if self.state == ReplicaState.EJECTED and now < self.ejected_until:
            return None
        self.in_a_row += 1
        backoff: float = min(MAX_BACKOFF, MIN_BACKOFF * 2.0 ** (self.in_a_row - 1))
        self.state = ReplicaState.EJECTED
        self.ejected_until = now + backoff
        return backoff

    def down(self, error: str) -> None:
        """Failed a health check: out until one passes (as /health says)."""
        self.failures += 1
        self.last_error = error
        self.checked = True
        self.state = ReplicaState.DOWN

    def usable(self, now: float) -> bool:
        if self.state == ReplicaState.DOWN:
            return False
        return self.state != ReplicaState.EJECTED or now >= self.ejected_until

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": str(self.state),
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "last_latency_ms": (
                None if self.last_latency is None else round(self.last_latency * 1000, 1)
            ),
            "last_error": self.last_error,
        }


@runtime_checkable
class Upstreamed(Protocol):
    """A job that knows how to run against replicas
    (:class:`vergeai.upstream.stream.RemoteJob`, which imports this module)."""

    def run(self, remote: Remote) -> None: ...


class Remote:
    """An online remote assistant: its replicas, the health thread, the HTTP client."""

    def __init__(self, assistant: Assistant, root: Path | None = None) -> None:
        self.assistant = assistant
        self.name = assistant.name
        self.root = root  # the state dir, for secrets.toml
        self.replicas = [Replica(url) for url in assistant.upstream]
        self.sessions: OrderedDict[tuple[str, str], Replica] = OrderedDict()
        self.started_at = time.time()
        self.requests_served = 0
        self.restarts = 0
        self.ended_at = 0.0
        self.load_seconds = 0.0
        self.queued = 0
        self.model = None  # nothing loaded here
        self.client: httpx.AsyncClient | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._watch, name=f"upstream-{self.name}", daemon=True
        )

    # what the pool and the views ask of a worker

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    facts = None  # the model is not here: upstreams take chat requests, not tokens

    crashed = False

    @property
    def status(self) -> WorkerState:
        if any(r.state == ReplicaState.HEALTHY for r in self.replicas):
            return WorkerState.ONLINE
        if not all(r.checked for r in self.replicas):
            return WorkerState.LOADING
        return WorkerState.ERROR

    state = status

    @property
    def error(self) -> str:
        if self.status != WorkerState.ERROR:
            return ""
        # no URLs: /health shows this to anyone; `vergeai workers` has each server's error
        n = len(self.replicas)
        return (
            f"none of its {n} upstream servers is healthy"
            if n > 1
            else "its upstream server is not healthy"
        )

    @property
    def problem(self) -> str | None:
        return self.error or None

    @property
    def n_ctx(self) -> int:
        return self.assistant.ctx

    @property
    def busy(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def share(self) -> int:
        return 1  # a request's choices go upstream as one request: one job

    def submit(self, job: Task) -> None:
        """Send the job upstream: it runs as a task on the event loop, trying replicas."""
        if not isinstance(job, Upstreamed):
            raise TypeError(f"assistant {self.name!r} takes upstream jobs only")
        job.run(self)

    def stats(self) -> dict[str, Any]:
        a = self.assistant
        return {
            "assistant": self.name,
            "model": a.model_name or a.upstream_model or "",
            "remote": True,
            "state": str(self.status),
            "error": self.error,
            "requests_served": self.requests_served,
            "in_flight": self.busy,
            "health_interval": a.health_interval,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "replicas": [r.stats() for r in self.replicas],
        }

    # routing, from the event loop

    def key(self) -> str | None:
        return upstream_key(self.assistant.upstream_key_env, self.root)

    def headers(self) -> dict[str, str]:
        key = self.key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def http(self) -> httpx.AsyncClient:
        """The client for answers, made on first use (inside the event loop)."""
        if self.client is None:
            timeout = self.assistant.upstream_timeout
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self.client

    def pick(self, session: tuple[str, str] | None, tried: list[Replica]) -> Replica:
        """The replica for the next attempt, or 503 when none may be tried now."""
        now = time.monotonic()
        if session is not None:
            kept = self.sessions.get(session)
            if kept is not None and kept not in tried and kept.state == ReplicaState.HEALTHY:
                self.sessions.move_to_end(session)
                return kept
        candidates = [r for r in self.replicas if r not in tried and r.usable(now)]
        healthy = [r for r in candidates if r.state == ReplicaState.HEALTHY]
        if not candidates:
            wait = min((r.ejected_until - now for r in self.replicas), default=MIN_BACKOFF)
            raise Unavailable(
                f"assistant {self.name!r}: none of its upstream servers is reachable now; "
                "try again shortly",
                retry_after=max(1, round(wait)),
            )
        chosen = min(healthy or candidates, key=lambda r: r.in_flight)
        if session is not None:
            self.sessions[session] = chosen
            self.sessions.move_to_end(session)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return chosen

    def failed(self, replica: Replica, error: str) -> None:
        backoff = replica.eject(error)
        if backoff is None:
            return
        log.warning(
            "assistant %s: upstream %s ejected for %.0f s: %s",
            self.name,
            replica.url,
            backoff,
            error,
        )

    # the health thread

    def _watch(self) -> None:
        interval = self.assistant.health_interval
        with httpx.Client(timeout=min(PROBE_TIMEOUT, interval)) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                for replica in self.replicas:
                    if self._stop.is_set():
                        return
                    self._probe(client, replica)
                self._stop.wait(max(0.05, interval - (time.monotonic() - started)))

    def _probe(self, client: httpx.Client, replica: Replica) -> None:
        """GET /health (or /v1/models where there is none): 2xx is healthy.

        A failed check takes the replica out (without growing its backoff:
        it is checked again next round); a passed one brings it back once the
        backoff of its failed requests has run out.
        """
        headers = self.headers()
        try:
            response = client.get(replica.base + "/health", headers=headers)
            if response.status_code == 404:
                response = client.get(replica.base + "/v1/models", headers=headers)
            if response.status_code >= 300:
                raise ProbeFailed(f"health check answered HTTP {response.status_code}")
        except (httpx.HTTPError, ProbeFailed) as exc:
            error = describe(exc)
            if replica.state != ReplicaState.DOWN or replica.last_error != error:
                log.warning("assistant %s: upstream %s fails its health check: %s",
                            self.name, replica.url, error)  # fmt: skip
            replica.down(error)
            return
        if replica.state == ReplicaState.HEALTHY or time.monotonic() < replica.ejected_until:
            return
        log.info("assistant %s: upstream %s is healthy", self.name, replica.url)
        replica.healthy()


class ProbeFailed(Exception):
    pass


def describe(exc: BaseException) -> str:
    """A short reason for an upstream failure, without request headers (so never the key)."""
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return str(exc)[:300]
