"""The limits engine alone, on a clock the test moves: windows, quotas, headers, tickets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vergeai.auth import Caller
from vergeai.errors import QuotaExceeded, RateLimited, VergeError
from vergeai.limits import Limits, duration, effective_limits, limits_text
from vergeai.state.accounts import ApiKey, User


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


def caller(user: dict[str, int] | None = None, key: dict[str, int] | None = None) -> Caller:
    return Caller(
        user=User(name="u", **(user or {})),
        key=ApiKey(name="k", user="u", hash="0" * 64, prefix="vai-…", **(key or {})),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limits(clock: Clock) -> Limits:
    return Limits(clock=lambda: clock.t, calendar=lambda: clock.wall)


def refused(limits: Limits, who: Caller, prompt: int = 0) -> VergeError:
    with pytest.raises(VergeError) as info:
        limits.admit(who, prompt)
    return info.value


def test_requests_per_minute_is_a_sliding_window(limits: Limits, clock: Clock) -> None:
    who = caller(key={"rpm": 3})
    for _ in range(3):
        limits.admit(who, 1).release()
        clock.advance(10)
    err = refused(limits, who)
    assert isinstance(err, RateLimited) and err.status == 429
    assert err.type == err.code == "rate_limit_exceeded"
    assert "requests per minute" in err.message and "key 'k'" in err.message
    # the first request was admitted 30 s ago: it leaves the window in 30 s
    assert err.headers["Retry-After"] == "30" and err.headers["retry-after-ms"] == "30000"
    clock.advance(29.9)
    refused(limits, who)
    clock.advance(0.2)
    limits.admit(who, 1).release()
    assert limits.refused["requests"] == 2


def test_n_answers_count_as_n_requests_in_flight(limits: Limits) -> None:
    who = caller(key={"max_concurrent": 3})
    two = limits.admit(who, 1, places=2)
    with pytest.raises(RateLimited) as info:
        limits.admit(who, 1, places=2)
    assert "counts as 2" in info.value.message and info.value.headers["Retry-After"] == "1"
    one = limits.admit(who, 1)
    two.release()
    two.release()  # twice is once: both places, not four
    assert limits.usage[("key", "u", "k")].in_flight == 1
    one.release()
    with pytest.raises(RateLimited) as never:  # more than the limit at once: waiting won't help
        limits.admit(who, 1, places=4)
    assert "ask for fewer" in never.value.message
    assert never.value.headers["x-should-retry"] == "false"


def test_what_requests_in_flight_may_still_use_is_held_against_quotas(limits: Limits) -> None:
    """8 concurrent n=4 requests once used 6x a daily quota: admission checked the prompt
    only. Now each holds its max_tokens x n until it has used or released them."""
    who = caller(key={"daily_tokens": 300, "tpm": 10_000})
    a = limits.admit(who, 10, places=4, reserve=240)
    b = limits.admit(who, 10, places=4, reserve=240)  # 10 + 240 + 10 fit in 300
    with pytest.raises(QuotaExceeded) as held:
        limits.admit(who, 10)
    assert "requests in flight may use 480 more" in held.value.message
    assert held.value.headers["Retry-After"] == "1"
    a.charge(100)  # what it used is counted; that much less is held for it
    assert limits.usage[("key", "u", "k")].reserved == 380
    a.release()  # the rest of its reservation is freed
    assert limits.usage[("key", "u", "k")].reserved == 240
    refused(limits, who)  # 120 used + 240 held + 10 > 300
    b.release()
    limits.admit(who, 10).release()  # 130 used, nothing held
    usage = limits.usage[("key", "u", "k")]
    assert usage.reserved == 0 and usage.day_tokens == 130 and usage.in_flight == 0


def test_the_user_limit_binds_every_key_of_the_user(limits: Limits) -> None:
    first = caller(user={"rpm": 2})
    second = Caller(user=first.user, key=ApiKey(name="k2", user="u", hash="1" * 64, prefix="x"))
    limits.admit(first, 1)
    limits.admit(second, 1)
    err = refused(limits, first)
    assert "user 'u'" in err.message
    assert effective_limits(first.user, first.key) == {"rpm": 2}


def test_the_tighter_limit_binds_and_is_named(limits: Limits) -> None:
    who = caller(user={"rpm": 5}, key={"rpm": 1, "tpm": 10**6})
    assert effective_limits(who.user, who.key) == {"rpm": 1, "tpm": 10**6}
    limits.admit(who, 1)
    assert "key 'k'" in refused(limits, who).message
    loose = caller(user={"max_concurrent": 1}, key={"max_concurrent": 9})
    assert effective_limits(loose.user, loose.key) == {"max_concurrent": 1}


def test_concurrency_counts_until_release_and_release_is_once(limits: Limits) -> None:
    who = caller(key={"max_concurrent": 2})
    a, b = limits.admit(who, 1), limits.admit(who, 1)
    err = refused(limits, who)
    assert "2 requests in flight" in err.message and err.headers["Retry-After"] == "1"
    a.release()
    a.release()  # twice is once
    c = limits.admit(who, 1)
    assert "in flight" in refused(limits, who).message
    b.release()
    c.release()
    assert limits.usage[("key", "u", "k")].in_flight == 0
    assert limits.usage[("user", "u")].in_flight == 0
    assert limits.refused["concurrency"] == 2


def test_tokens_per_minute_count_prompts_at_admission_and_completions_as_made(
    limits: Limits, clock: Clock
) -> None:
    who = caller(key={"tpm": 100})
    ticket = limits.admit(who, 40)
    assert limits.headers(who)["x-ratelimit-remaining-tokens"] == "60"
    ticket.charge(10)
    ticket.charge(25)  # the total so far: 15 more
    ticket.charge(20)  # never less than counted
    assert limits.headers(who)["x-ratelimit-remaining-tokens"] == "35"
    assert (ticket.prompt_tokens, ticket.completion_tokens) == (40, 25)
    ticket.release()
    clock.advance(5)
    err = refused(limits, who, 40)  # 65 used + 40 > 100
    assert "tokens per minute" in err.message and "used 65, requested 40" in err.message
    # the 65 tokens were counted in one second: they all leave 61 s after it started
    assert 55 <= int(err.headers["Retry-After"]) <= 57
    limits.admit(who, 35).release()  # exactly the limit
    clock.advance(61)  # tokens count until their whole second has left the window
    limits.admit(who, 100).release()


def test_a_prompt_over_the_token_limit_is_not_worth_retrying(limits: Limits) -> None:
    err = refused(limits, caller(key={"tpm": 100}), 101)
    assert "Request too large" in err.message and "requested 101" in err.message
    assert err.headers == {"x-should-retry": "false"}


def test_a_stream_crossing_a_limit_finishes_and_the_next_waits(limits: Limits) -> None:
    who = caller(key={"tpm": 50})
    ticket = limits.admit(who, 10)
    ticket.charge(200)  # nothing refuses a request already admitted
    assert limits.headers(who)["x-ratelimit-remaining-tokens"] == "0"
    assert isinstance(refused(limits, who, 1), RateLimited)


def test_quotas_are_per_utc_day_and_month(limits: Limits, clock: Clock) -> None:
    who = caller(key={"daily_tokens": 100}, user={"monthly_tokens": 150})
    limits.admit(who, 90).release()
    err = refused(limits, who, 20)
    assert isinstance(err, QuotaExceeded) and err.status == 429
    assert err.type == err.code == "insufficient_quota"
    assert (
        "daily quota of 100 tokens" in err.message and "renews at 2026-02-01 00:00" in err.message
    )
    assert err.headers["x-should-retry"] == "false" and err.headers["Retry-After"] == "60"
    clock.advance(61)  # February 1st: a new day and a new month
    limits.admit(who, 100).release()
    err = refused(limits, who, 1)
    assert "daily" in err.message
    assert limits.refused["daily_quota"] == 2


def test_the_monthly_quota_outlasts_days(limits: Limits, clock: Clock) -> None:
    who = caller(user={"monthly_tokens": 150})
    limits.admit(who, 100).release()
    clock.advance(3600)  # February 1st, 00:59
    limits.admit(who, 150).release()
    clock.advance(86400)
    err = refused(limits, who, 1)
    assert "user 'u' has used 150 of its monthly quota of 150 tokens" in err.message
    assert "renews at 2026-03-01 00:00" in err.message
    assert limits.refused["monthly_quota"] == 1


def test_quotas_are_seeded_from_the_usage_record(limits: Limits) -> None:
    limits.seed(day={("u", "k"): 80}, month={("u", "k"): 120, ("u", "other"): 30})
    assert (
        "used 80 of its daily quota"
        in refused(limits, caller(key={"daily_tokens": 90}), 20).message
    )
    assert (
        "used 150 of its monthly"
        in refused(limits, caller(user={"monthly_tokens": 160}), 20).message
    )


def test_headers_show_the_binding_limit(limits: Limits, clock: Clock) -> None:
    assert limits.headers(caller()) == {}  # no per-minute limit: no headers
    assert limits.headers(caller(key={"max_concurrent": 3})) == {}
    who = caller(user={"rpm": 10, "tpm": 1000}, key={"rpm": 3})
    limits.admit(who, 100).release()
    clock.advance(2.5)
    assert limits.headers(who) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "58s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "59s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.0101, "11ms"), (1, "1s"), (1.2, "2s"), (59.5, "1m0s"), (61, "1m1s")],
)
def test_durations_read_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_limits_read_in_a_table() -> None:
    assert limits_text({}) == "-"
    assert limits_text({"rpm": 1, "max_concurrent": 2, "daily_tokens": 3}) == (
        "rpm 1, concurrent 2, daily 3"
    )


def test_a_user_or_key_made_again_under_a_deleted_ones_name_starts_afresh(
    limits: Limits,
) -> None:
    """The counters were keyed by name: a new carol inherited the old one's quota use
    (and requests in flight) until the server restarted."""
    old = caller(user={"daily_tokens": 100})
    limits.admit(old, 90)  # still in flight when its user is deleted
    made_again = Caller(
        user=User(name="u", daily_tokens=100, created=old.user.created + timedelta(seconds=1)),
        key=ApiKey(name="k", user="u", hash="1" * 64, prefix="vai-…"),
    )
    limits.admit(made_again, 100).release()
    with pytest.raises(QuotaExceeded):
        limits.admit(made_again, 1)
    assert limits.usage[("user", "u")].in_flight == 0
    assert limits.usage[("key", "u", "k")].day_tokens == 100


def test_seeded_usage_belongs_to_whoever_has_the_name(limits: Limits) -> None:
    limits.seed(day={("u", "k"): 80}, month={("u", "k"): 80})
    assert "used 80" in refused(limits, caller(key={"daily_tokens": 90}), 20).message


def test_a_request_running_past_midnight_counts_each_token_to_its_day(
    limits: Limits, clock: Clock
) -> None:
    who = caller(key={"daily_tokens": 100})
    ticket = limits.admit(who, 30)  # 23:59:00
    ticket.charge(40)
    clock.advance(61)  # 00:00:01, February 1st
    ticket.charge(50)
    ticket.release()
    assert ticket.days == {"2026-01-31": [30, 40], "2026-02-01": [0, 10]}
    limits.admit(who, 90).release()  # the new day's quota has 10 used
    assert "used 100" in refused(limits, who, 1).message
