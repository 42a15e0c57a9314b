"""Remote assistants without a network: routing, ejection, the upstream's events, keys.

What a real upstream does is in test_upstream.py; these pin the rules that
are hard to provoke there (a backoff's growth, a reasoning upstream, a
session's replica going down, an upstream's odd error bodies).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from vergeai.api.outputs import Answer
from vergeai.errors import Unavailable
from vergeai.runtime.job import Delta
from vergeai.state.assistants import Assistant
from vergeai.upstream.failure import Failure, error_message
from vergeai.upstream.progress import CHARS_PER_TOKEN, Progress, token_count
from vergeai.upstream.replicas import MAX_BACKOFF, Remote, ReplicaState, base_of
from vergeai.upstream.secrets import upstream_key
from vergeai.upstream.stream import RemoteJob, _read


def remote(*urls: str) -> Remote:
    assistant = Assistant(name="r", upstream=list(urls), upstream_model="m").validate()
    r = Remote(assistant)
    for replica in r.replicas:
        replica.healthy()
    return r


def test_base_url_drops_v1_and_slashes() -> None:
    assert base_of("http://h:8000/v1") == base_of("http://h:8000/v1/") == "http://h:8000"
    assert base_of("https://h/proxy/v1") == "https://h/proxy"
    assert base_of("http://h:8000") == "http://h:8000"


def test_fewest_in_flight_wins_and_a_session_sticks_while_healthy() -> None:
    r = remote("http://a", "http://b", "http://c")
    a, b, c = r.replicas
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert r.pick(None, []) is b
    assert r.pick(("u", "s1"), []) is b  # the session's first turn: the least busy
    b.in_flight = 5
    assert r.pick(("u", "s1"), []) is b  # later turns: the same one, busy or not
    assert r.pick(("u", "s2"), []) is c  # another session goes elsewhere
    r.failed(b, "connection refused")
    assert r.pick(("u", "s1"), []) is c  # its replica is out: moved, and sticks there now
    b.healthy()
    assert r.pick(("u", "s1"), []) is c
    assert r.pick(("u", "s1"), [c]) is a  # a retry goes to another one


def test_ejection_backoff_doubles_per_failure_in_a_row_and_in_flight_ones_count_once() -> None:
    r = remote("http://a", "http://b")
    a, b = r.replicas
    assert a.eject("x") == 1.0
    assert a.eject("y") is None  # requests that were in flight when it went down
    assert a.failures == 2 and a.last_error == "y"
    waits = []
    for _ in range(8):
        a.ejected_until = time.monotonic() - 0.01  # its time is out; it fails again
        waits.append(a.eject("z"))
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    a.healthy()
    assert a.in_a_row == 0 and a.eject("again") == 1.0
    assert r.pick(None, []) is b
    b.eject("down too")
    with pytest.raises(Unavailable) as caught:
        r.pick(None, [])
    assert caught.value.headers["Retry-After"] == "1"
    assert "http://" not in caught.value.message  # no upstream URL to clients


def test_states_for_the_pool_and_health() -> None:
    assistant = Assistant(name="r", upstream=["http://a", "http://b"], upstream_model="m")
    r = Remote(assistant)
    assert r.status == "loading" and r.error == ""
    r.replicas[0].down("refused")
    assert r.status == "loading"  # b not checked yet
    r.replicas[1].down("refused")
    assert r.status == "error" and r.error == "none of its 2 upstream servers is healthy"
    with pytest.raises(Unavailable):  # routing agrees: none may be tried
        r.pick(None, [])
    r.replicas[1].healthy()
    assert r.status == "online"
    assert r.replicas[0].state == ReplicaState.DOWN
    assert r.pick(None, []) is r.replicas[1]
    with pytest.raises(Unavailable):  # the one that is down is no retry either
        r.pick(None, [r.replicas[1]])


def job(n: int = 1, hold: bool = False) -> RemoteJob:
    return RemoteJob(max_tokens=8, choices=n, hold=hold)


def chunk(index: int = 0, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def events(j: RemoteJob) -> list[tuple[int, Any]]:
    out = []
    while not j.queue.empty():
        out.append(j.queue.get_nowait())
    return out


def test_an_upstream_s_reasoning_content_and_tool_call_deltas_become_pieces() -> None:
    j = job()
    progress = Progress(1)
    _read(j, chunk(role="assistant", content=None), progress)  # nothing to pass on
    _read(j, chunk(reasoning_content="Let me think."), progress)
    _read(j, chunk(reasoning="vLLM's name."), progress)
    _read(j, chunk(content="Hi"), progress)
    calls = [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]
    _read(j, chunk(tool_calls=calls), progress)
    _read(j, chunk(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]), progress)
    _read(j, chunk(finish="tool_calls"), progress)
    _read(j, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}, progress)
    got = [e for _, e in events(j)]
    assert all(isinstance(e, Delta) for e in got) and len(got) == 5
    answer = Answer(raw=False, opens_think=False, logprobs=False, calls=None)
    pieces = [answer.feed(e, 0) for e in got]
    assert "".join(p.reasoning for p in pieces) == "Let me think.vLLM's name."
    assert "".join(p.content for p in pieces) == "Hi"
    assert [(c.id, c.name, c.arguments) for c in answer.tool_calls] == [("call_1", "f", '{"a": 1}')]
    assert progress.finish == {0: "stop"} and progress.usage == {
        "prompt_tokens": 9, "completion_tokens": 5,
    }  # fmt: skip
    assert progress.passed and j.n_generated == 5


def test_think_tags_in_an_upstream_s_text_are_split_like_a_local_model_s() -> None:
    answer = Answer(raw=False, opens_think=False, logprobs=False, calls=None)
    pieces = [answer.feed(Delta(t), 0) for t in ("<think>", "plan", "</think>", "Answer")]
    pieces.append(answer.flush(0))
    assert "".join(p.reasoning for p in pieces) == "plan"
    assert "".join(p.content for p in pieces) == "Answer"


def test_a_whole_answer_is_held_back_until_complete_so_it_can_be_retried() -> None:
    j = job(hold=True)
    progress = Progress(1)
    _read(j, chunk(content="Hel"), progress)
    _read(j, chunk(content="lo"), progress)
    assert events(j) == [] and not progress.passed  # nothing reached the client
    assert [d.text for _, d in progress.held] == ["Hel", "lo"]


def test_an_upstream_is_held_to_max_tokens_however_it_sends() -> None:
    """max_tokens 8: at most 8 pieces, and 8 x CHARS_PER_TOKEN characters, per choice."""
    j = job(n=2)
    progress = Progress(2)
    _read(j, chunk(index=0, content="x" * 1_000_000), progress)  # one huge piece
    for _ in range(9):  # a piece past max_tokens
        _read(j, chunk(index=1, content="y"), progress)
    _read(j, chunk(index=0, content="more"), progress)  # after its end: dropped
    texts = {0: "", 1: ""}
    for index, event in events(j):
        texts[index] += event.text
    assert texts == {0: "x" * 8 * CHARS_PER_TOKEN, 1: "y" * 8}
    assert progress.finish == {0: "length", 1: "length"} and progress.cut and progress.complete


def test_an_upstreams_wild_counts_are_held_to_what_the_request_could_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote = Remote(Assistant(name="r", upstream=["http://a"], upstream_model="m"))
    assert token_count(12, 0, 64, "completion_tokens", remote) == 12
    assert token_count(None, 7, 64, "completion_tokens", remote) == 7  # none reported: our count
    assert token_count(10**30, 0, 64, "completion_tokens", remote) == 64
    assert token_count(-5, 0, 64, "prompt_tokens", remote) == 0  # would credit quotas
    assert "reported completion_tokens 1000000000000000000000000000000" in caplog.text


def test_a_choice_not_asked_for_is_a_failure() -> None:
    with pytest.raises(Failure, match="choice 3"):
        _read(job(n=2), chunk(index=3, content="x"), Progress(2))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "too long", "code": 400}}', "too long"),
        (b'{"error": "plain"}', "plain"),
        (b'{"object": "error", "message": "vLLM says no"}', "vLLM says no"),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b"\xff\xfe not utf-8", "\ufffd\ufffd not utf-8"),
    ],
)
def test_the_message_of_any_error_body(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_the_key_comes_from_the_environment_else_a_private_secrets_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UP_KEY", raising=False)
    assert upstream_key(None, tmp_path) is None
    assert upstream_key("UP_KEY", tmp_path) is None
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('UP_KEY = "from-file"\nOTHER = 3\n')
    secrets.chmod(0o600)
    assert upstream_key("UP_KEY", tmp_path) == "from-file"
    assert upstream_key("OTHER", tmp_path) is None  # not a string
    monkeypatch.setenv("UP_KEY", "from-env")
    assert upstream_key("UP_KEY", tmp_path) == "from-env"
    monkeypatch.delenv("UP_KEY")
    secrets.chmod(0o640)
    assert upstream_key("UP_KEY", tmp_path) is None  # others may read it: not used
    secrets.chmod(0o600)
    secrets.write_text("UP_KEY = [broken")
    assert upstream_key("UP_KEY", tmp_path) is None
    assert os.stat(secrets).st_mode & 0o777 == 0o600


SSE_ANSWER = (
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)


async def _one_answer_per_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers the first request of a connection, kept alive; closes on the second unanswered."""
    for answered in (True, False):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        if not answered:
            break
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(SSE_ANSWER), SSE_ANSWER)
        )
        await writer.drain()
    writer.close()


def test_a_kept_alive_connection_the_upstream_closed_is_retried_on_a_new_one() -> None:
    async def run() -> list[Any]:
        server = await asyncio.start_server(_one_answer_per_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r = remote(f"http://127.0.0.1:{port}")
        results = []
        for _ in range(3):
            j = RemoteJob(max_tokens=8, body={"model": "m"})
            j.run(r)
            assert j.task is not None
            await j.task
            results.append([type(e).__name__ for _, e in events(j)])
            await asyncio.sleep(0.05)  # the server closes the kept connection meanwhile
        assert r.replicas[0].failures == 0 and r.replicas[0].state == ReplicaState.HEALTHY
        await r.http().aclose()
        server.close()
        return results

    assert asyncio.run(run()) == [["Delta", "Finished"]] * 3
