"""Parallel slots: continuous batching without cross-talk, queue limits, slot reuse."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import HARBOR, NO_EOS, Server, by_assistant, cli_ok, free_port, run_cli

from vergeai.state.admin_socket import ask

PROMPTS = [
    "Tell me about whales.",
    "What is 2+2?",
    "Write a poem about the sea and the sky.",
    "List three colours.",
]


class Slots:
    def __init__(self, server: Server, token: str) -> None:
        self.server = server
        self.token = token

    def pieces(
        self, model: str, content: str, max_tokens: int = 24, seen: list[float] | None = None
    ) -> list[str]:
        """Greedy streamed answer, one piece per generated token (each one's arrival in seen)."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": NO_EOS,
            "stream": True,
        }
        pieces = []
        with (
            self.server.http(self.token) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        pieces.append(chunk["choices"][0]["delta"]["content"])
                        if seen is not None:
                            seen.append(time.monotonic())
        return pieces

    def chat(self, model: str, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
        with self.server.http(self.token) as http:
            response = http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": messages, "logit_bias": NO_EOS, **extra},
            )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def workers(self) -> dict[str, Any]:
        with self.server.http(self.token) as http:
            assert http.get("/health").status_code == 200
        snapshot = ask(self.server.state_dir, "workers")
        assert snapshot is not None
        return snapshot


@pytest.fixture(scope="module")
def slots(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Slots]:
    root = tmp_path_factory.mktemp("slots")
    state = root / "state"
    common = ["--model", model_path, "--chat-format", "gemma", "--threads", "2"]
    cli_ok(state, "user", "create", "u")
    cli_ok(state, "assistant", "create", "par", *common, "--ctx", "512", "--parallel", "4")
    cli_ok(state, "assistant", "create", "solo", *common, "--ctx", "512", "--max-queue", "1")
    cli_ok(state, "assistant", "create", "twin", *common, "--ctx", "512", "--offline")
    cli_ok(state, "assistant", "create", "wide", *common, "--ctx", "2048", "--parallel", "3")
    cli_ok(state, "assistant", "create", "wide1", *common, "--ctx", "2048")
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Slots(server, token)
    finally:
        server.stop()


def first_difference(a: list[str], b: list[str]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def test_batched_requests_give_their_solo_answers(slots: Slots) -> None:
    """No cross-talk between sequences decoded in one batch.

    What we allow: a batch sums llama.cpp's matrix products in another order
    than a single sequence does, so where the model's top two logits are
    nearly tied the greedy choice can flip, and the texts go their own way
    from there. This demo model has such near-ties (0.086 apart at the 7th
    token of "Tell me about whales."; seen diverging at tokens 6 and 12).
    So every batched answer must match its solo answer for its first 4
    tokens, and the answers together for at least half of their tokens.
    Cross-talk (a sequence seeing another's tokens) breaks answers from
    their first tokens on, and all of them.
    """
    alone = [slots.pieces("par", p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: slots.pieces("par", p), PROMPTS))
    assert all(len(t) == 24 for t in together), "every stream delivered in full"
    diverged = [first_difference(a, t) for a, t in zip(alone, together, strict=True)]
    assert all(d >= 4 for d in diverged), diverged
    assert sum(diverged) >= 24 * len(PROMPTS) // 2, diverged


def test_requests_really_run_in_one_batch(slots: Slots) -> None:
    """Four streams on four slots are decoded together, not one after another.

    Not timed: this test once compared the wall time of four requests with
    that of one, and a ratio of times breaks on a busy 2-core machine. What
    it checks instead cannot be bent by load: the workers view shows all
    four slots busy at one moment, and every stream is half way through its
    answer before any other has finished (one after another, the first
    would end before the last began). The worker has one thread, which
    decodes every busy slot's next token in one batch per step, so streams
    that progress side by side are batched.
    """
    seen: list[list[float]] = [[] for _ in PROMPTS]
    busy: set[int] = set()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [
            pool.submit(slots.pieces, "par", p, 64, arrivals)
            for p, arrivals in zip(PROMPTS, seen, strict=True)
        ]
        while not all(s.done() for s in streams):
            snapshot = ask(slots.server.state_dir, "workers")
            assert snapshot is not None
            par = by_assistant(snapshot["workers"])["par"]
            busy.add(par["busy_slots"])
            time.sleep(0.02)
        assert all(len(s.result()) == 64 for s in streams)
    assert max(busy) == 4, busy
    halfway = max(arrivals[len(arrivals) // 2] for arrivals in seen)
    first_end = min(arrivals[-1] for arrivals in seen)
    assert halfway < first_end, "a stream was not half way through when another ended"


def test_slot_reuse_keeps_each_conversation_prefix(slots: Slots) -> None:
    convs = {
        name: [{"role": "user", "content": f"{name}: " + "tell me everything about it. " * 8}]
        for name in ("whales", "volcanoes")
    }
    firsts = {name: slots.chat("par", m, max_tokens=6, temperature=0) for name, m in convs.items()}
    for name, first in firsts.items():
        follow = [
            *convs[name],
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "More, please."},
        ]
        second = slots.chat("par", follow, max_tokens=2, temperature=0)
        # the slot holding this conversation was chosen: only new tokens evaluated
        assert second["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] - 1
        assert second["timings"]["prompt_n"] < second["usage"]["prompt_tokens"] // 2


def test_two_prompts_sent_in_turn_each_keep_their_slot(slots: Slots) -> None:
    """An exact repeat evaluates one token, however another prompt that starts alike
    came in between (it takes another slot, with the shared opening copied in)."""
    opening = "A question from the repeat test, about things in the world around us all: " * 2
    questions = ("what is a harbor?", "what is an orchard, and who tends one?")
    prompts = [[{"role": "user", "content": opening + q}] for q in questions]
    answers = [slots.chat("par", prompts[i % 2], max_tokens=8, temperature=0) for i in range(6)]
    assert answers[1]["timings"]["cache_n"] >= 30  # the opening, copied from the first one's slot
    for i, answer in enumerate(answers[2:], 2):
        assert answer["timings"]["prompt_n"] == 1, (i, answer["timings"])
        first = answers[i % 2]["choices"][0]["message"]["content"]
        assert answer["choices"][0]["message"]["content"] == first


def test_a_shared_prefix_is_copied_from_a_busy_slot(slots: Slots) -> None:
    """A document many requests share is evaluated once per worker, not once per slot,
    and what is copied answers as the document evaluated afresh does."""
    document = "Notes: " + " ".join(f"Box {i} holds {i * 7} red stones." for i in range(40))

    def ask(model: str, question: str, max_tokens: int = 6) -> dict[str, Any]:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": question}]
        return slots.chat(model, messages, max_tokens=max_tokens, temperature=0)

    question = "How many red stones does box number 12 hold, and why is that so? Answer briefly."
    afresh = ask("solo", question)  # another assistant: nothing of the document cached
    assert afresh["timings"]["cache_n"] < 20
    ask("par", "Which box holds the fewest stones of all the boxes in these notes?")
    busy = threading.Thread(
        target=lambda: ask("par", "Describe every box in these notes, one by one, in order.", 48)
    )
    busy.start()
    try:
        time.sleep(0.3)
        copied = ask("par", question)
    finally:
        busy.join()
    assert copied["timings"]["cache_n"] > afresh["usage"]["prompt_tokens"] - 40
    pieces = [copied, afresh]
    texts = [p["choices"][0]["message"]["content"] for p in pieces]
    assert texts[0][:12] == texts[1][:12], texts


INVENTORY = "Inventory: " + " ".join(f"Shelf {i} has {i * 3} blue jars." for i in range(110))
SHELF_QUESTIONS = (
    "How many blue jars are on shelf 12? Answer briefly.",
    "Which shelf has the most jars of all? Answer briefly.",
    "Are there any shelves without jars? Answer briefly.",
)


def ask_inventory(slots: Slots, model: str, question: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": INVENTORY}, {"role": "user", "content": question}]
    return slots.chat(model, messages, max_tokens=6, temperature=0)


def test_requests_arriving_together_evaluate_their_shared_prefix_once(slots: Slots) -> None:
    """Three requests with the same ~1,300-token document arrive at once: one evaluates
    it (several steps), the others wait for it and copy it, then answer as afresh."""
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda q: ask_inventory(slots, "wide", q), SHELF_QUESTIONS))
    prompt_tokens = min(a["usage"]["prompt_tokens"] for a in answers)
    assert prompt_tokens > 1000
    cached = sorted(a["timings"]["cache_n"] for a in answers)
    assert cached[0] < 20, cached  # the first one evaluated the document
    assert cached[1] > prompt_tokens - 40 and cached[2] > prompt_tokens - 40, cached
    evaluated = sum(a["timings"]["prompt_n"] for a in answers)
    assert evaluated < prompt_tokens + 100, evaluated
    copied = max(range(3), key=lambda i: answers[i]["timings"]["cache_n"])
    afresh = ask_inventory(slots, "wide1", SHELF_QUESTIONS[copied])
    texts = [a["choices"][0]["message"]["content"] for a in (answers[copied], afresh)]
    assert texts[0][:12] == texts[1][:12], texts


def test_requests_waiting_on_a_prefix_go_on_when_its_request_leaves(slots: Slots) -> None:
    """The request decoding the shared document disconnects part way (its prompt takes
    about 2.5 s, in 512-token steps): the two waiting for it take what it decoded, one
    evaluates the rest and the other waits for that one in turn; both answer."""
    document = INVENTORY.replace("blue", "green")

    def ask(question: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": question}]
        return slots.chat("wide", messages, max_tokens=6, temperature=0)

    def leave() -> None:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": "Hi."}]
        body = {"model": "wide", "messages": messages, "max_tokens": 6, "temperature": 0}
        with slots.server.http(slots.token) as http, pytest.raises(httpx.TimeoutException):
            http.post("/v1/chat/completions", json=body, timeout=1.2)

    leaver = threading.Thread(target=leave)
    leaver.start()
    try:
        time.sleep(0.1)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, SHELF_QUESTIONS[:2]))
    finally:
        leaver.join()
    for answer in answers:
        assert answer["usage"]["completion_tokens"] == 6
        timings = answer["timings"]
        assert timings["cache_n"] + timings["prompt_n"] == answer["usage"]["prompt_tokens"]
    prompt_tokens = min(a["usage"]["prompt_tokens"] for a in answers)
    # whole 512-token steps of the leaver's were copied, not evaluated again
    cached = sorted(a["timings"]["cache_n"] for a in answers)
    assert 500 <= cached[0] < prompt_tokens - 40, cached
    assert cached[1] > prompt_tokens - 40, cached


def test_a_shared_prefix_outlives_answers_longer_than_the_window(slots: Slots) -> None:
    """Two requests with the same document get answers long enough (520 tokens) that
    neither slot still caches the sliding window before the document's end; a third
    still finds the document cached, in the keeper: a sequence, never decoded, that
    keeps the latest prefix two prompts shared."""
    document = "\n\n".join(f"Day {day}. {HARBOR}" for day in range(1, 5))

    def ask(question: str, max_tokens: int) -> dict[str, Any]:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": question}]
        return slots.chat("wide", messages, max_tokens=max_tokens, temperature=0)

    # copying the document, one at a time: speculation makes them quick
    long = [ask("Repeat the text above exactly.", 520) for _ in range(2)]
    assert all(a["usage"]["completion_tokens"] == 520 for a in long)
    assert long[1]["timings"]["cache_n"] == 0  # the first one's window was gone
    third = ask("What did the baker do?", 4)
    assert third["timings"]["cache_n"] > third["usage"]["prompt_tokens"] - 40, third["timings"]


def test_full_queue_is_503_with_retry_after(slots: Slots) -> None:
    body = {
        "model": "solo",
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 2000,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    with (
        slots.server.http(slots.token) as a,
        a.stream("POST", "/v1/chat/completions", json=body) as r1,
    ):
        assert r1.status_code == 200
        lines = r1.iter_lines()
        next(lines)
        waiting: dict[str, int] = {}

        def wait_in_queue() -> None:
            with slots.server.http(slots.token) as b:
                short = {**body, "max_tokens": 2, "stream": False}
                waiting["status"] = b.post("/v1/chat/completions", json=short).status_code

        queued = threading.Thread(target=wait_in_queue)
        queued.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            par = by_assistant(slots.workers()["workers"])
            if par["solo"]["queue_depth"] == 1:
                break
            time.sleep(0.05)
        with slots.server.http(slots.token) as c:
            full = c.post("/v1/chat/completions", json={**body, "stream": False})
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
    # dropping the stream frees the slot: the queued request is served at once
    queued.join(15)
    assert waiting.get("status") == 200


def test_disconnect_frees_the_only_slot_for_the_queue(slots: Slots) -> None:
    body = {
        "model": "solo",
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 3000,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    with (
        slots.server.http(slots.token) as a,
        a.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    start = time.monotonic()
    slots.chat("solo", body["messages"], max_tokens=3)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5


def test_two_assistants_share_one_gguf_in_memory(slots: Slots) -> None:
    before = slots.workers()
    rss_before = before["helper"]["rss_bytes"]
    model_bytes = by_assistant(before["workers"])["par"]["model_bytes"]
    cli_ok(slots.server.state_dir, "assistant", "online", "twin")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = by_assistant(slots.workers()["workers"])
            if workers.get("twin", {}).get("state") == "online":
                break
            time.sleep(0.1)
        slots.chat("twin", [{"role": "user", "content": "Hi"}], max_tokens=2)
        after = slots.workers()
        twin = by_assistant(after["workers"])["twin"]
        grew = after["helper"]["rss_bytes"] - rss_before
        # a second copy of the weights would add ~model_bytes; sharing adds its KV cache and less
        assert grew < model_bytes / 2, (grew, model_bytes, twin["kv_cache_bytes"])
    finally:
        cli_ok(slots.server.state_dir, "assistant", "offline", "twin")


def test_parallel_setting_is_shown_and_validated(slots: Slots, tmp_path: Path) -> None:
    par = by_assistant(slots.workers()["workers"])["par"]
    assert par["parallel"] == 4 and par["busy_slots"] == 0
    code, _, _ = run_cli(tmp_path, "assistant", "edit", "par", "--parallel", "0")
    assert code == 2
    assert httpx.get(f"{slots.server.root_url}/health").json()["assistants"]["par"] == "online"
