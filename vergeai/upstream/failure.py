"""A failed attempt at an upstream, and what its error says (scrubbed of credentials)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from vergeai.errors import Unavailable, UpstreamFailed, UpstreamRefused, VergeError
from vergeai.runtime.job import Failed

MAX_ERROR_BODY = 64 * 1024


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


def failed(failure: Failure) -> Failed:
    """The event that ends the request when its last attempt failed."""
    error = failure.error
    if error is None and failure.eject:  # the replicas are down: worth retrying later
        error = Unavailable(
            f"no upstream server could answer ({failure.reason}); try again shortly",
            retry_after=2,
        )
    if error is None:
        error = UpstreamFailed(f"the upstream server failed the request: {failure.reason}")
    return Failed(error.message, error=error)


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


def error_message(body: bytes) -> str:
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


async def refusal(response: httpx.Response) -> Failure:
    """An answer other than 200, as the failure it is (its body read up to a bound)."""
    body = b""
    async for part in response.aiter_bytes():
        body += part
        if len(body) > MAX_ERROR_BODY:
            break
    status = response.status_code
    message = error_message(body)
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


def mid_stream_error(error: Any) -> Failure:
    """An error event in the middle of an answer."""
    message = error.get("message") if isinstance(error, dict) else error
    text = scrub(str(message)[:2000])
    error = UpstreamFailed(f"the upstream server failed the answer: {text}")
    return Failure(f"an error in the answer: {text}", eject=False, error=error)
