"""The prefix cache tells one caller nothing of another's prompts (issue 26's cache probe).

One server: ``gemma`` with 3 slots (and, Gemma 3 being a sliding-window
model, the keeper) and a system prompt every caller shares; users ``victim``
and ``mallory``. The victim asks once with a secret; mallory guesses it a
digit at a time and reads ``cached_tokens``: every guess must read the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import BackgroundStream, Server, cli_ok, free_port

SYSTEM = (
    "You are the help desk of the harbor town bank. Answer politely and briefly, in plain "
    "words, and never repeat account numbers back to the customer. "
) * 3
# a form letter many customers send, with the secret at its end
LETTER = (
    "Dear help desk of the harbor town bank, I am writing about my account because my card "
    "was blocked at the machine this morning, and I need it back soon. My bank PIN digits are {}"
)
SECRET = LETTER.format("4 8 1 5 9 2, thank you.")


@dataclass
class Bank:
    server: Server
    tokens: dict[str, str]

    def cached(self, user: str, text: str, **fields: Any) -> int:
        body = {"model": "gemma", "messages": [{"role": "user", "content": text}],
                "max_tokens": 1, "temperature": 0, **fields}  # fmt: skip
        with self.server.http(self.tokens[user]) as http:
            response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == response.json()["timings"][
            "cache_n"
        ]  # fmt: skip
        return int(usage["prompt_tokens_details"]["cached_tokens"])


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Bank]:
    root = tmp_path_factory.mktemp("bank")
    state = root / "state"
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format",
           "gemma", "--threads", "2", "--ctx", "1024", "--parallel", "3",
           "--system-prompt", SYSTEM, "--speculate", "off")  # fmt: skip
    tokens = {}
    for user in ("victim", "mallory", "crowd"):
        cli_ok(state, "user", "create", user)
        tokens[user] = cli_ok(state, "key", "create", "--user", user, "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Bank(server, tokens)
    finally:
        server.stop()


def test_a_guess_at_another_users_prompt_reads_the_same_whatever_it_guesses(bank: Bank) -> None:
    """Two slots busy with a third user's streams: the victim and mallory take turns in the
    one left (and the keeper holds what two prompts shared), as on a loaded server.
    (Speculation is off so that the streams last as long as their tokens say.)"""
    opening = bank.cached("victim", "Good morning.")  # the system prompt, cached for all
    crowd = [BackgroundStream(bank.server.root_url, bank.tokens["crowd"], "gemma", 300)
             for _ in range(2)]  # fmt: skip
    for stream in crowd:
        stream.start()
    bank.cached("victim", SECRET)
    assert bank.cached("victim", SECRET) > opening + 20  # the victim's own repeat is cached
    probe = LETTER + " zzqx"
    guesses = {}
    for digit in range(10):
        bank.cached("victim", SECRET)  # the victim's conversation goes on
        guesses[digit] = bank.cached("mallory", probe.format(digit))
    # What mallory's own guesses left cached (in the one free slot, or the keeper) varies
    # with timing; the victim's letter never adds a token for the right digit, 4: a leak
    # would read one more than any wrong guess can.
    wrong = max(n for digit, n in guesses.items() if digit != 4)
    assert guesses[4] <= wrong, guesses
    busy = [(s.thread.is_alive(), s.status, s.error, len(s.events)) for s in crowd]
    assert all(alive for alive, *_ in busy), f"the slots were not busy throughout: {busy}"
    for stream in crowd:
        stream.join()


def test_every_caller_shares_the_system_prompt(bank: Bank) -> None:
    bank.cached("victim", "What are your opening hours?")
    shared = bank.cached("mallory", "Where is the nearest branch?")
    system_tokens = len(SYSTEM.split())  # at least about a token a word
    assert shared >= system_tokens, shared


def test_cache_salt_narrows_the_sharing_to_one_salt(bank: Bank) -> None:
    text = "Please explain the difference between a savings account and a deposit account."
    bank.cached("victim", text, cache_salt="tenant-a")
    same = bank.cached("victim", text, cache_salt="tenant-a")
    other = bank.cached("victim", text, cache_salt="tenant-b")
    unsalted = bank.cached("victim", text)
    assert same > other + 10 and same > unsalted + 10, (same, other, unsalted)
    bad = {"model": "gemma", "messages": [{"role": "user", "content": "x"}], "cache_salt": 7}
    response = httpx.post(f"{bank.server.base_url}/chat/completions", json=bad,
                          headers={"Authorization": f"Bearer {bank.tokens['victim']}"})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_cache_scope_key_keeps_each_key_to_its_own(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "state"
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format",
           "gemma", "--threads", "2", "--ctx", "512", "--parallel", "2")  # fmt: skip
    cli_ok(state, "user", "create", "team")
    tokens = {k: cli_ok(state, "key", "create", "--user", "team", "--name", k).strip()
              for k in ("ci", "laptop")}  # fmt: skip
    (state / "config.toml").write_text('cache_scope = "key"\n')
    server = Server(state_dir=state, port=free_port(), log_path=tmp_path / "serve.log")
    server.start()
    try:
        bank = Bank(server, tokens)
        text = "Summarise the minutes of the last board meeting of the harbor town bank, please."
        bank.cached("ci", text)
        assert bank.cached("ci", text) > 20
        assert bank.cached("laptop", text) < 5  # the same user, another key: nothing shared
    finally:
        server.stop()
