"""The request's own record: who called, for which assistant, what it cost, why it was refused.

One :class:`RequestRecord` per HTTP request, made by the access log
middleware as the request arrives and filled in as it goes (the guard that
authenticates, the body reader, the endpoint); read once at the end by the
access log, the usage ledger and the metrics. Never the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from vergeai.auth import Caller
from vergeai.limits import Gate, Ticket
from vergeai.state.ledger import Record


@dataclass
class RequestRecord:
    request_id: str
    assistant: str = "-"  # as the body named it, even if the request is refused
    caller: Caller | None = None  # whose x-ratelimit-* headers the response carries
    refused: str | None = None  # why a key was refused, which the client is never told
    refused_key: str | None = None  # user/key of a key that was refused, when it names one
    gate: Gate | None = None  # the caller's way through its limits, once checked
    usage: dict[str, Any] = field(default_factory=dict)  # OpenAI's usage of the answer
    ttft: float | None = None  # seconds to the first token
    streaming: bool = False  # the body asks for a stream ("stream": true)

    @property
    def user(self) -> str:
        return self.caller.user.name if self.caller is not None else "-"

    @property
    def key(self) -> str:
        if self.caller is not None:
            return self.caller.key.name
        return self.refused_key or "-"

    @property
    def ticket(self) -> Ticket | None:
        return self.gate.ticket if self.gate is not None else None

    def counted(self) -> dict[str, Any]:
        """The answer's usage; for a request cut short, what its limits counted."""
        ticket = self.ticket
        if not self.usage and ticket is not None:
            return {
                "prompt_tokens": ticket.prompt_tokens,
                "completion_tokens": ticket.completion_tokens,
            }
        return self.usage

    def ledger_row(self, assistant: str, endpoint: str, status: int, ms: float) -> Record:
        """The usage record of an authenticated request (``assistant`` a configured one)."""
        assert self.caller is not None
        usage = self.counted()
        return Record(
            at=datetime.now(UTC).isoformat(),
            user=self.user,
            key=self.key,
            assistant=assistant,
            endpoint=endpoint[:64],
            status=status,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            duration_ms=ms,
            request_id=self.request_id,
        )


def record_of(request: Request) -> RequestRecord:
    """The request's record (the access log middleware made it)."""
    record: RequestRecord = request.state.record
    return record


def caller_of(request: Request) -> Caller:
    """The authenticated caller of a guarded route."""
    caller = record_of(request).caller
    assert caller is not None  # the route's guard authenticated it
    return caller
