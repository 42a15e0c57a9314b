"""Test helpers shared by several test modules (fixtures stay in conftest)."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

NO_EOS = {"1": -100, "106": -100, "212": -100}  # every end-of-generation token of Gemma 3
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(response: httpx.Response) -> list[Any]:
    """The data payloads of an event stream, JSON-decoded; '[DONE]' stays a string."""
    events: list[Any] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, checked for its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


class BackgroundStream:
    """A streamed chat completion running in a thread while the test does other things."""

    def __init__(self, root_url: str, token: str, model: str, max_tokens: int = 24) -> None:
        self.events: list[Any] = []
        self.status = 0
        self.started = threading.Event()
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Count slowly from one to one hundred."}],
            "max_tokens": max_tokens,
            "logit_bias": NO_EOS,
            "stream": True,
        }
        self.url = f"{root_url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundStream:
        self.thread.start()
        assert self.started.wait(30), "the background stream never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)

    def _run(self) -> None:
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", self.url, json=self.body, headers=self.headers) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: ") :]
                    self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                    self.started.set()
        self.started.set()

    def completed(self) -> bool:
        """Ended with [DONE] after every token it asked for, and no error event."""
        self.thread.join(60)
        if self.status != 200 or not self.events or self.events[-1] != "[DONE]":
            return False
        if any("error" in e for e in self.events if isinstance(e, dict)):
            return False
        pieces = [
            c["delta"].get("content") or "" for e in self.events[:-1] for c in e.get("choices", [])
        ]
        last = self.events[-2]
        return bool(pieces) and last["choices"][0]["finish_reason"] == "length"
