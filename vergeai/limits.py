"""Limits on users and keys: requests and tokens per minute, requests at once, token quotas.

Enforced in the process that owns the slots: a request is checked and
admitted in one synchronous step on the event loop once its prompt tokens
are known, so two concurrent requests cannot both take the last place. A
key counts against its own limits and its user's; the tighter binds.

Per-minute limits are a sliding 60-second window: requests by admission
time, tokens in one-second buckets (a prompt's tokens when it is admitted,
completion tokens as they are generated; a stream that crosses a limit
finishes). Quotas run per UTC day and calendar month; the server seeds them
from the usage record when it starts, so they survive a restart.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from vergeai.auth import Caller
from vergeai.errors import QuotaExceeded, RateLimited, VergeError
from vergeai.state.accounts import LIMITS, ApiKey, Limited, User

WINDOW = 60.0
REASONS = ("requests", "tokens", "concurrency", "daily_quota", "monthly_quota")
Subject = tuple[str, ...]  # ("user", name) or ("key", user, name)
Refusal = tuple[str, VergeError]  # the reason (one of REASONS) and the 429 to answer


def effective_limits(user: User, key: ApiKey) -> dict[str, int]:
    """The tighter of the key's and its user's limits, each that either sets."""
    own, parent = key.limits(), user.limits()
    return {
        name: min(v for v in (own.get(name), parent.get(name)) if v is not None)
        for name in LIMITS
        if name in own or name in parent
    }


SHORT = {"max_concurrent": "concurrent", "daily_tokens": "daily", "monthly_tokens": "monthly"}


def limits_text(limits: dict[str, int]) -> str:
    """For a table: "rpm 60, tpm 10000, daily 100000", or "-"."""
    return ", ".join(f"{SHORT.get(name, name)} {value}" for name, value in limits.items()) or "-"


def duration(seconds: float) -> str:
    """OpenAI's reset format: 250ms, 12s, 1m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Usage:
    """One user's or key's running usage."""

    in_flight: int = 0
    reserved: int = 0  # completion tokens requests in flight may still use (max_tokens)
    requests: deque[float] = field(default_factory=deque)  # admission times in the window
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, tokens], oldest first
    day: str = ""
    day_tokens: int = 0
    month: str = ""
    month_tokens: int = 0
    owner: str = ""  # the user or key as created; "" for usage seeded by name

    def expire(self, t: float) -> None:
        while self.requests and self.requests[0] <= t - WINDOW:
            self.requests.popleft()
        # a bucket counts until its whole second has left the window
        while self.buckets and self.buckets[0][0] + 1 <= t - WINDOW:
            self.buckets.popleft()

    def minute_tokens(self) -> int:
        return sum(tokens for _, tokens in self.buckets)

    def roll(self, day: str) -> None:
        """A new UTC day or month starts its quota from zero."""
        if self.day != day:
            self.day, self.day_tokens = day, 0
        if self.month != day[:7]:
            self.month, self.month_tokens = day[:7], 0

    def add(self, tokens: int, t: float, day: str) -> None:
        self.roll(day)
        second = int(t)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])
        self.day_tokens += tokens
        self.month_tokens += tokens


class Limits:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        calendar: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.clock = clock
        self.calendar = calendar
        self.usage: dict[Subject, Usage] = {}
        self.refused = dict.fromkeys(REASONS, 0)

    def seed(self, day: dict[tuple[str, str], int], month: dict[tuple[str, str], int]) -> None:
        """Today's and this month's tokens per (user, key), from the usage record."""
        today = self.calendar().date().isoformat()
        for (user, key), tokens in month.items():
            for subject in (("key", user, key), ("user", user)):
                usage = self._usage(subject, today)
                usage.month_tokens += tokens
                usage.day_tokens += day.get((user, key), 0)

    def _usage(self, subject: Subject, today: str, owner: str = "") -> Usage:
        """The subject's usage; a user or key deleted and created again under the same
        name starts afresh (its predecessor's requests in flight keep the old one)."""
        usage = self.usage.get(subject)
        if usage is None or (owner and usage.owner and usage.owner != owner):
            usage = self.usage[subject] = Usage()
        if owner and not usage.owner:
            usage.owner = owner
        usage.roll(today)
        return usage

    def _subjects(self, caller: Caller) -> list[tuple[str, Limited, Usage]]:
        """The key's and the user's limits and usage, as of now."""
        t, today = self.clock(), self.calendar().date().isoformat()
        key, user = caller.key, caller.user
        out: list[tuple[str, Limited, Usage]] = []
        for who, limited, subject, owner in (
            (f"key {key.name!r}", key, ("key", user.name, key.name), key.hash),
            (f"user {user.name!r}", user, ("user", user.name), user.created.isoformat()),
        ):
            usage = self._usage(subject, today, owner)
            usage.expire(t)
            out.append((who, limited, usage))
        return out

    def check(self, caller: Caller, prompt_tokens: int = 0, places: int = 1) -> list[Usage]:
        """Raise the 429 to answer if the caller may not start a request of that prompt now;
        else the key's and the user's usage. ``places``: what the request counts as against
        max_concurrent (n choices count as n requests)."""
        subjects = self._subjects(caller)
        for who, limited, usage in subjects:
            refusal = self._refusal(who, limited, usage, prompt_tokens, places)
            if refusal is not None:
                reason, error = refusal
                self.refused[reason] += 1
                raise error
        return [usage for _, _, usage in subjects]

    def admit(
        self, caller: Caller, prompt_tokens: int, places: int = 1, reserve: int = 0
    ) -> Ticket:
        """Check, then count the request and its prompt: one step, nothing awaited.

        ``reserve``: the completion tokens it may generate (max_tokens for each answer),
        held against quotas and tokens per minute until it has used or released them,
        so that requests admitted together cannot overshoot a limit by more than one
        request's reservation.
        """
        usages = self.check(caller, prompt_tokens, places)
        t = self.clock()
        for usage in usages:
            usage.in_flight += places
            usage.reserved += reserve
            usage.requests.append(t)
        ticket = Ticket(self, usages, 0, places, reserve)
        ticket.settle_prompt(prompt_tokens)
        return ticket

    def charge(self, usages: list[Usage], tokens: int) -> str:
        """Count tokens now; returns the UTC day they counted to."""
        t, today = self.clock(), self.calendar().date().isoformat()
        for usage in usages:
            usage.add(tokens, t, today)
        return today

    def _refusal(
        self, who: str, limited: Limited, usage: Usage, prompt: int, places: int
    ) -> Refusal | None:
        """The first limit the request would pass, and the error to answer; None if none."""
        t = self.clock()
        now = self.calendar()
        return (
            _quota_refusal(who, limited, usage, prompt, now)
            or _concurrency_refusal(who, limited, usage, places)
            or _rate_refusal(who, limited, usage, prompt, t)
        )

    def headers(self, caller: Caller) -> dict[str, str]:
        """OpenAI's x-ratelimit-* for the binding per-minute limits, when the caller has any."""
        t = self.clock()
        subjects = self._subjects(caller)
        out: dict[str, str] = {}
        requests = [(lim.rpm - len(u.requests), lim.rpm, u) for _, lim, u in subjects if lim.rpm]
        if requests:
            remaining, limit, usage = min(requests, key=lambda r: r[0])
            reset = usage.requests[-1] + WINDOW - t if usage.requests else 0.0
            out["x-ratelimit-limit-requests"] = str(limit)
            out["x-ratelimit-remaining-requests"] = str(max(0, remaining))
            out["x-ratelimit-reset-requests"] = duration(reset)
        tokens = [(lim.tpm - u.minute_tokens(), lim.tpm, u) for _, lim, u in subjects if lim.tpm]
        if tokens:
            remaining, limit, usage = min(tokens, key=lambda r: r[0])
            reset = usage.buckets[-1][0] + 1 + WINDOW - t if usage.buckets else 0.0
            out["x-ratelimit-limit-tokens"] = str(limit)
            out["x-ratelimit-remaining-tokens"] = str(max(0, remaining))
            out["x-ratelimit-reset-tokens"] = duration(reset)
        return out


def _quota_refusal(
    who: str, limited: Limited, usage: Usage, prompt: int, now: datetime
) -> Refusal | None:
    """The monthly, then the daily token quota (prompt and reserved completion tokens)."""
    for reason, quota, used, renews in (
        ("monthly_quota", limited.monthly_tokens, usage.month_tokens, _next_month(now)),
        ("daily_quota", limited.daily_tokens, usage.day_tokens, _next_day(now)),
    ):
        if quota is not None and used + usage.reserved + prompt > quota:
            period = reason.split("_")[0]
            wait = (renews - now).total_seconds()
            if used + prompt <= quota:  # requests in flight may use the rest
                return reason, QuotaExceeded(
                    f"{who} has used {used} of its {period} quota of {quota} tokens and "
                    f"requests in flight may use {usage.reserved} more; try again when "
                    "they have finished",
                    retry_after=1,
                )
            return reason, QuotaExceeded(
                f"{who} has used {used} of its {period} quota of {quota} tokens"
                + (f" and this prompt needs {prompt}" if used < quota else "")
                + f"; it renews at {renews:%Y-%m-%d %H:%M} UTC",
                retry_after=math.ceil(wait),
            )
    return None


def _concurrency_refusal(who: str, limited: Limited, usage: Usage, places: int) -> Refusal | None:
    """Requests in flight; n choices count as n."""
    if limited.max_concurrent is None:
        return None
    if places > limited.max_concurrent:
        return "concurrency", RateLimited(
            f"{who} may have {limited.max_concurrent} requests in flight, and this one "
            f"asks for {places} answers at once, which count as {places}; ask for fewer",
            retry_after=None,
        )
    if usage.in_flight + places > limited.max_concurrent:
        return "concurrency", RateLimited(
            f"{who} has {usage.in_flight} requests in flight, its limit"
            + (f" for this one, which counts as {places}" if places > 1 else "")
            + "; try again when one has finished",
            retry_after=1.0,
        )
    return None


def _rate_refusal(
    who: str, limited: Limited, usage: Usage, prompt: int, t: float
) -> Refusal | None:
    """Requests per minute, then tokens per minute."""
    if limited.rpm is not None and len(usage.requests) >= limited.rpm:
        wait = usage.requests[0] + WINDOW - t
        return "requests", RateLimited(
            f"Rate limit reached for {who} on requests per minute (RPM): "
            f"limit {limited.rpm}, used {len(usage.requests)}. "
            f"Please try again in {duration(wait)}.",
            retry_after=wait,
        )
    if limited.tpm is None:
        return None
    used = usage.minute_tokens()
    if prompt > limited.tpm:
        return "tokens", RateLimited(
            f"Request too large for {who} on tokens per minute (TPM): "
            f"limit {limited.tpm}, requested {prompt}. Shorten the prompt.",
            retry_after=None,
        )
    if used + usage.reserved + prompt <= limited.tpm:
        return None
    wait = _tokens_free_in(usage, used + prompt - limited.tpm, t)
    if used + prompt <= limited.tpm:  # requests in flight may use the rest
        wait = 1.0
    reserved = f", reserved by requests in flight {usage.reserved}" if usage.reserved else ""
    return "tokens", RateLimited(
        f"Rate limit reached for {who} on tokens per minute (TPM): "
        f"limit {limited.tpm}, used {used}, requested {prompt}{reserved}. "
        f"Please try again in {duration(wait)}.",
        retry_after=wait,
    )


def _tokens_free_in(usage: Usage, needed: int, t: float) -> float:
    """Seconds until ``needed`` tokens have left the window (if nothing more is added)."""
    freed = 0
    for second, tokens in usage.buckets:
        freed += tokens
        if freed >= needed:
            return second + 1 + WINDOW - t
    return WINDOW


def _next_day(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


def _next_month(now: datetime) -> datetime:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


class Ticket:
    """An admitted request's place: its completion tokens are counted as they come."""

    def __init__(
        self,
        limits: Limits,
        usages: list[Usage],
        prompt_tokens: int,
        places: int = 1,
        reserve: int = 0,
    ) -> None:
        self.limits = limits
        self.usages = usages
        self.prompt_tokens = prompt_tokens
        self.places = places
        self.reserved = reserve  # what is still held for it
        self.completion_tokens = 0
        self.released = False
        # prompt and completion tokens counted to each UTC day: one running past
        # midnight counts what it generated before it to the day before
        self.days: dict[str, list[int]] = {}

    def charge(self, completion_tokens: int) -> None:
        """The request's completion tokens so far; those not yet counted are counted now
        (and no longer held in reserve)."""
        new = completion_tokens - self.completion_tokens
        if new > 0:
            self.completion_tokens = completion_tokens
            day = self.limits.charge(self.usages, new)
            self.days.setdefault(day, [0, 0])[1] += new
            self._unreserve(new)

    def _unreserve(self, tokens: int) -> None:
        freed = min(tokens, self.reserved)
        self.reserved -= freed
        for usage in self.usages:
            usage.reserved -= freed

    def settle_prompt(self, prompt_tokens: int) -> None:
        """Count the prompt (at admission; again when an estimate is settled to what its
        server counted: only the difference)."""
        more = prompt_tokens - self.prompt_tokens
        if more > 0:
            self.prompt_tokens = prompt_tokens
            day = self.limits.charge(self.usages, more)
            self.days.setdefault(day, [0, 0])[0] += more

    def release(self) -> None:
        """The request has ended: its place is free (once, however often called)."""
        if not self.released:
            self.released = True
            for usage in self.usages:
                usage.in_flight -= self.places
            self._unreserve(self.reserved)


@dataclass
class Gate:
    """One request's way through its caller's limits: checked early, admitted with its prompt."""

    limits: Limits
    caller: Caller
    ticket: Ticket | None = None
    scope: str = ""  # whose prompts these are, for the prefix cache: the user, or the key

    def check(self, prompt_tokens: int = 0, places: int = 1) -> None:
        self.limits.check(self.caller, prompt_tokens, places)

    def admit(self, prompt_tokens: int, places: int = 1, reserve: int = 0) -> Ticket:
        self.ticket = self.limits.admit(self.caller, prompt_tokens, places, reserve)
        return self.ticket
