"""Remote assistants: vergeai in front of real upstream servers on the demo model.

The upstreams are a second `vergeai serve` (always) and llama.cpp's
`llama-server` (when built: ``VERGEAI_LLAMA_SERVER`` or the benchmark's
cache; those tests skip otherwise). A pass-through proxy in front of an
upstream keeps the bodies vergeai sent, so the tests see what the upstream
received: the system prompt, the thinking switch, the history, the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import (
    HELLO,
    NO_EOS,
    BackgroundStream,
    Server,
    by_assistant,
    cli_ok,
    error_of,
    eventually,
    free_port,
    run_cli,
    sse_events,
)
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from vergeai.upstream.progress import CHARS_PER_TOKEN

UPSTREAM_KEY = "sk-upstream-3f9a1c77e0b24d5e"  # what the upstreams accept; never in vergeai's files
LLAMA_KEY = "sk-llama-8d02b6f1c9a34e70"
PIRATE = "You are a pirate captain. Mention the sea."


def find_llama_server() -> Path | None:
    given = os.environ.get("VERGEAI_LLAMA_SERVER")
    if given:
        return Path(given)
    built = sorted(
        Path.home().glob(".cache/vergeai-bench/llama-cpp-python-*/build/bin/llama-server")
    )
    return built[-1] if built else None


LLAMA_SERVER = find_llama_server()
needs_llama_server = pytest.mark.skipif(
    LLAMA_SERVER is None or not LLAMA_SERVER.exists(),
    reason="llama-server is not built (../shared/tools/build-llama-server.sh, or set "
    "VERGEAI_LLAMA_SERVER)",
)


class Recorder:
    """A pass-through proxy to a real upstream that keeps every chat body and key it forwarded."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Recorder:
        self._thread.start()
        eventually(lambda: _up(f"http://127.0.0.1:{self.port}/health"), 10, "the proxy")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.keys.append(request.headers.get("authorization"))
        client = httpx.AsyncClient(timeout=120)
        upstream = await client.send(
            client.build_request(
                "POST",
                self.target + "/v1/chat/completions",
                json=body,
                headers={"authorization": request.headers.get("authorization", "")},
            ),
            stream=True,
        )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for part in upstream.aiter_raw():
                    yield part
            finally:
                await upstream.aclose()
                await client.aclose()

        kind = upstream.headers.get("content-type", "application/json")
        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=kind)

    async def _health(self, request: Request) -> Response:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(self.target + "/health")
        return Response(r.content, r.status_code, media_type="application/json")

    def _serve(self) -> None:
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/health", self._health),
            ]
        )
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None

        async def stopped() -> None:
            while not self._stop.is_set():
                await asyncio.sleep(0.05)

        asyncio.run(serve(app, config, shutdown_trigger=stopped))  # type: ignore[arg-type]


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class LlamaServer:
    model: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        assert LLAMA_SERVER is not None
        argv = [
            str(LLAMA_SERVER), "-m", self.model, "-c", "2048", "-np", "2", "-t", "1",
            "--no-jinja", "--chat-template", "gemma", "--api-key", LLAMA_KEY,
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        eventually(lambda: _up(self.url + "/health"), 60, "llama-server up")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Flood(Recorder):
    """An upstream that ignores max_tokens: 1,000,000 characters in 100 pieces, healthy."""

    async def _chat(self, request: Request) -> Response:
        self.bodies.append(await request.json())

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(100):
                chunk = {"choices": [{"index": 0, "delta": {"content": "x" * 10_000}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(pieces(), media_type="text/event-stream")

    async def _health(self, request: Request) -> Response:
        return Response('{"status": "ok"}', media_type="application/json")


class Echo(Flood):
    """An upstream whose 400 quotes the request's Authorization header (and, asked for
    model "moved", that answers a redirect)."""

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        if body.get("model") == "moved":
            return Response(status_code=302)
        quoted = f"bad request from {request.headers.get('authorization')}"
        return Response(json.dumps({"error": {"message": quoted}}), 400,
                        media_type="application/json")  # fmt: skip


@dataclass
class Env:
    front: Server
    state: Path
    token: str  # an admin's key on the front
    metered: str  # a key limited to 2 requests a minute
    upstream: Server  # the vergeai upstream (never killed)
    victim: Server  # a vergeai upstream the failover test kills and brings back
    pirate: Recorder  # in front of the upstream, for the pirate assistant
    pair: tuple[Recorder, Recorder]  # both in front of the upstream, for affinity
    llama: LlamaServer | None
    flood: Flood
    echo: Echo

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return self.front.client(self.token, **kwargs)

    def http(self) -> httpx.Client:
        return self.front.http(self.token)

    def workers(self) -> dict[str, Any]:
        out = cli_ok(self.state, "workers", "--json")
        return by_assistant(json.loads(out)["workers"])


def _vergeai_upstream(root: Path, name: str, model_path: str) -> Server:
    state = root / name
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format",
           "gemma", "--threads", "1", "--ctx", "1024", "--parallel", "4")  # fmt: skip
    cli_ok(state, "user", "create", "front")
    token = cli_ok(state, "key", "create", "--user", "front", "--name", "front").strip()
    # the upstream accepts the test's fixed key: its hash goes in the keys file
    keys = (state / "keys.toml").read_text()
    from vergeai.auth import hash_token

    (state / "keys.toml").write_text(keys.replace(hash_token(token), hash_token(UPSTREAM_KEY)))
    server = Server(state_dir=state, port=free_port(), log_path=root / f"{name}.log")
    server.start(timeout=120)
    return server


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("upstream")
    upstream = _vergeai_upstream(root, "upstream", model_path)
    victim = _vergeai_upstream(root, "victim", model_path)
    llama = None
    if LLAMA_SERVER is not None and LLAMA_SERVER.exists():
        llama = LlamaServer(model_path, free_port(), root / "llama-server.log").start()
    pirate = Recorder(upstream.root_url).start()
    pair = (Recorder(upstream.root_url).start(), Recorder(upstream.root_url).start())
    flood = Flood(upstream.root_url).start()
    echo = Echo(upstream.root_url).start()
    state = root / "front"
    remote = ["--upstream-model", "gemma", "--upstream-key-env", "UPSTREAM_KEY"]
    cli_ok(state, "assistant", "create", "pirate", "--upstream", pirate.url, *remote,
           "--system-prompt", PIRATE, "--disable-think", "--chat-history")  # fmt: skip
    cli_ok(state, "assistant", "create", "pair", "--upstream", pair[0].url,
           "--upstream", pair[1].url, *remote, "--chat-history")  # fmt: skip
    cli_ok(state, "assistant", "create", "direct", "--upstream", upstream.base_url, *remote)
    cli_ok(state, "assistant", "create", "flood", "--upstream", flood.url, *remote)
    cli_ok(state, "assistant", "create", "echo", "--upstream", echo.url, *remote)
    cli_ok(state, "assistant", "create", "moved", "--upstream", echo.url, "--upstream-model",
           "moved", "--upstream-key-env", "UPSTREAM_KEY")  # fmt: skip
    cli_ok(state, "assistant", "create", "failover", "--upstream", victim.base_url,
           "--upstream", upstream.root_url, *remote, "--health-interval", "0.5")  # fmt: skip
    cli_ok(state, "assistant", "create", "badkey", "--upstream", upstream.base_url,
           "--upstream-model", "gemma", "--upstream-key-env", "WRONG_KEY")  # fmt: skip
    cli_ok(state, "assistant", "create", "filekey", "--upstream", upstream.base_url,
           "--upstream-model", "gemma", "--upstream-key-env", "FILE_KEY")  # fmt: skip
    if llama is not None:
        cli_ok(state, "assistant", "create", "llama", "--upstream", llama.url,
               "--upstream-model", "gemma", "--upstream-key-env", "LLAMA_KEY")  # fmt: skip
    cli_ok(state, "user", "create", "root", "--role", "admin")
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "root").strip()
    cli_ok(state, "user", "create", "metered")
    metered = cli_ok(state, "key", "create", "--user", "metered", "--name", "m", "--rpm", "2",
                     "--tpm", "100000").strip()  # fmt: skip
    secrets = state / "secrets.toml"
    secrets.write_text(f'FILE_KEY = "{UPSTREAM_KEY}"\n')
    secrets.chmod(0o600)
    front = Server(
        state_dir=state,
        port=free_port(),
        log_path=root / "front.log",
        env={"UPSTREAM_KEY": UPSTREAM_KEY, "LLAMA_KEY": LLAMA_KEY, "WRONG_KEY": "sk-wrong"},
    )
    front.start(timeout=60)
    env = Env(front, state, token, metered, upstream, victim, pirate, pair, llama, flood, echo)
    try:
        eventually(
            lambda: all(w["state"] == "online" for w in env.workers().values() if w.get("remote")),
            20,
            "every remote assistant online",
        )
        yield env
    finally:
        front.stop()
        for recorder in (pirate, *pair, flood, echo):
            recorder.stop()
        for server in (upstream, victim):
            server.stop()
        if llama is not None:
            llama.stop()


CHAT: dict[str, Any] = {"messages": HELLO, "max_tokens": 8, "temperature": 0}


def test_whole_and_streamed_through_vergeai_upstream_with_the_front_s_system_prompt(
    env: Env,
) -> None:
    client = env.client()
    before = len(env.pirate.bodies)
    whole = client.chat.completions.create(model="pirate", **CHAT)
    assert whole.model == "pirate"
    assert whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.prompt_tokens > 10
    sent = env.pirate.bodies[before]
    assert sent["model"] == "gemma"  # the upstream's own name
    assert sent["messages"][0] == {"role": "system", "content": PIRATE}
    assert sent["messages"][1:] == HELLO
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}  # --disable-think
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert env.pirate.keys[before] == f"Bearer {UPSTREAM_KEY}"
    # the system prompt reached the model: the prompt is longer than without it
    direct = client.chat.completions.create(model="direct", **CHAT)
    assert direct.usage is not None and whole.usage.prompt_tokens > direct.usage.prompt_tokens + 5

    stream = client.chat.completions.create(
        model="pirate", stream=True, stream_options={"include_usage": True}, **CHAT
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    timings = chunks[-1].model_extra["timings"]  # the upstream's, passed on
    assert timings["predicted_n"] == 8 and timings["prompt_n"] + timings["cache_n"] > 10


def test_sampling_fields_tools_schema_logprobs_and_n_reach_the_upstream(env: Env) -> None:
    """Every field a remote assistant passes on, through the real model, beside another stream."""
    client = env.client()
    before = len(env.pirate.bodies)
    # on the same upstream model worker, not through the recorder
    other = BackgroundStream(env.front.root_url, env.token, "direct", max_tokens=400).start()
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    called = client.chat.completions.create(
        model="pirate",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert "city" in json.loads(choice.message.tool_calls[0].function.arguments)  # type: ignore[union-attr]

    shaped = client.chat.completions.create(
        model="pirate",
        messages=HELLO,
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "schema": {
                    "type": "object",
                    "properties": {"capital": {"type": "string"}},
                    "required": ["capital"],
                },
            },
        },
        logprobs=True,
        top_logprobs=2,
        n=2,
        seed=7,
        top_p=0.5,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        stop=["\n\n\n"],
        extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1},
    )
    assert len(shaped.choices) == 2
    for c in shaped.choices:
        assert "capital" in json.loads(c.message.content or "")
        assert c.logprobs is not None and c.logprobs.content
        assert len(c.logprobs.content[0].top_logprobs) == 2
    with env.http() as http:
        constrained = http.post(
            "/v1/chat/completions",
            json={"model": "pirate", "messages": HELLO, "max_tokens": 4, "temperature": 0,
                  "grammar": 'root ::= "yes" | "no"', "repeat_last_n": 32,
                  "reasoning_format": "none", "chat_template_kwargs": {"enable_thinking": True}},
        )  # fmt: skip
    assert constrained.status_code == 200, constrained.text
    assert constrained.json()["choices"][0]["message"]["content"] in ("yes", "no")
    assert other.completed()
    tools_body, shaped_body, constrained_body = env.pirate.bodies[before:]
    assert {k: constrained_body.get(k) for k in ("grammar", "repeat_last_n", "reasoning_format",
                                                 "chat_template_kwargs")} == {
        "grammar": 'root ::= "yes" | "no"', "repeat_last_n": 32, "reasoning_format": "none",
        "chat_template_kwargs": {"enable_thinking": True},  # the request's, over --disable-think
    }  # fmt: skip
    assert tools_body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert tools_body["tools"][0]["function"]["name"] == "get_weather"
    assert tools_body["parallel_tool_calls"] is False
    expected = {"n": 2, "seed": 7, "top_p": 0.5, "presence_penalty": 0.5, "top_k": 5,
                "frequency_penalty": 0.25, "stop": ["\n\n\n"], "min_p": 0.1,
                "repeat_penalty": 1.1, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    assert {k: shaped_body.get(k) for k in expected} == expected
    assert shaped_body["response_format"]["json_schema"]["schema"]["required"] == ["capital"]


def test_chat_history_is_kept_by_the_front_and_sessions_stick_to_a_replica(env: Env) -> None:
    first_a, first_b = (len(r.bodies) for r in env.pair)
    with env.http() as http:
        for turn in ("My name is Ada.", "What is my name?", "And again?"):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": "pair",
                    "messages": [{"role": "user", "content": turn}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
                headers={"X-Session-ID": "ada-1"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["session"]["id"] == "ada-1"
    new = [r.bodies[n:] for r, n in zip(env.pair, (first_a, first_b), strict=True)]
    assert sorted(len(b) for b in new) == [0, 3]  # every turn on the same replica
    bodies = new[0] or new[1]
    assert [m["content"] for m in bodies[2]["messages"] if m["role"] == "user"] == [
        "My name is Ada.", "What is my name?", "And again?",
    ]  # fmt: skip
    assert bodies[2]["messages"][1]["role"] == "assistant"  # the remembered answers


def test_concurrent_requests_spread_over_replicas_by_requests_in_flight(env: Env) -> None:
    counts = [len(r.bodies) for r in env.pair]

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=env.front.base_url, api_key=env.token, max_retries=0)
        async with client:
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="pair", messages=HELLO, max_tokens=24, logit_bias=NO_EOS
                    )
                    for _ in range(6)
                )
            )

    asyncio.run(run())
    added = [len(r.bodies) - n for r, n in zip(env.pair, counts, strict=True)]
    assert sum(added) == 6 and min(added) >= 2, added


def test_limits_and_the_usage_record_apply_to_a_remote_assistant(env: Env) -> None:
    client = env.front.client(env.metered)
    answers = [
        client.chat.completions.with_raw_response.create(model="direct", **CHAT) for _ in range(2)
    ]
    headers = answers[-1].headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # the upstream's token count, not the estimate, is what the minute's tokens hold
    used = sum(a.parse().usage.total_tokens for a in answers)  # type: ignore[union-attr]
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100000 - used
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="direct", **CHAT)
    assert "requests per minute (RPM): limit 2" in caught.value.message

    def usage() -> dict[str, Any]:
        row: dict[str, Any] = json.loads(cli_ok(env.state, "usage", "--json", "--key", "m"))[0]
        return row

    eventually(lambda: usage()["requests"] == 3, 5, "three requests in the usage record")
    rows = [usage()]
    assert rows[0]["requests"] == 3 and rows[0]["completion_tokens"] == 16
    assert rows[0]["prompt_tokens"] == sum(a.parse().usage.prompt_tokens for a in answers)  # type: ignore[union-attr]


def test_an_upstream_ignoring_max_tokens_is_held_to_it(env: Env) -> None:
    with env.http() as http:
        whole = http.post("/v1/chat/completions", json={**CHAT, "model": "flood"}).json()
        streamed = sse_events(
            http.post("/v1/chat/completions", json={**CHAT, "model": "flood", "stream": True})
        )
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length", choice["finish_reason"]
    assert 0 < len(choice["message"]["content"]) <= 8 * CHARS_PER_TOKEN
    text = "".join(c["delta"].get("content") or "" for e in streamed[:-1] for c in e["choices"])
    assert 0 < len(text) <= 8 * CHARS_PER_TOKEN
    assert [c["finish_reason"] for e in streamed[:-1] for c in e["choices"]][-1] == "length"


def test_an_upstreams_error_text_never_carries_its_key_and_a_redirect_is_a_502(
    env: Env,
) -> None:
    with env.http() as http:
        echoed = http.post("/v1/chat/completions", json={**CHAT, "model": "echo"})
        moved = http.post("/v1/chat/completions", json={**CHAT, "model": "moved"})
    assert echoed.status_code == 400, echoed.text
    assert "bad request from Bearer [redacted]" in error_of(echoed)["message"]
    assert UPSTREAM_KEY not in echoed.text
    assert moved.status_code == 502 and "redirect (HTTP 302)" in error_of(moved)["message"]
    assert UPSTREAM_KEY not in env.front.log()


@needs_llama_server
def test_llama_server_upstream_whole_streamed_and_its_refusals(env: Env) -> None:
    client = env.client()
    whole = client.chat.completions.create(model="llama", **CHAT)
    assert whole.choices[0].message.content and whole.usage is not None
    assert whole.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="llama", stream=True, **CHAT))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text  # not compared with `whole`: llama-server reads the second prompt from its cache
    assert chunks[-1].model_extra["timings"]["predicted_n"] == 8  # llama-server's timings
    # a prompt longer than llama-server's slot: its 400, relayed with its message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert "upstream server refused the request" in str(caught.value)
    assert LLAMA_KEY not in str(caught.value)


def test_a_disconnecting_client_cancels_the_upstream_request(env: Env) -> None:
    body = {"model": "direct", "messages": HELLO, "max_tokens": 900, "logit_bias": NO_EOS,
            "stream": True}  # fmt: skip
    line = re.compile(r"POST /v1/chat/completions (\d+) assistant=gemma user=front key=front "
                      r"prompt_tokens=\d+ completion_tokens=(\d+)")  # fmt: skip
    before = len(line.findall(env.upstream.log()))
    with env.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while "content" not in next(lines):
            pass
    # the upstream stops generating: its request ends long before 900 tokens (15 s)
    started = time.monotonic()
    eventually(lambda: len(line.findall(env.upstream.log())) > before, 5, "the upstream's end")
    assert time.monotonic() - started < 5
    status, tokens = line.findall(env.upstream.log())[-1]
    assert int(tokens) < 300, (status, tokens)


def test_killing_a_replica_loses_no_request_that_had_not_started_and_it_comes_back(
    env: Env,
) -> None:
    results: list[str] = []

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        if i % 2:
            try:
                stream = await client.chat.completions.create(
                    model="failover", messages=HELLO, max_tokens=24, logit_bias=NO_EOS,
                    stream=True,
                )  # fmt: skip
            except openai.APIError as exc:
                results.append(f"refused: {exc}")  # before any byte: must not happen
                return
            got = 0
            try:
                async for chunk in stream:
                    got += bool(chunk.choices and chunk.choices[0].delta.content)
                results.append("ok")
            except openai.APIError:
                results.append("cut" if got else f"cut before its first token ({got})")
        else:
            try:
                await client.chat.completions.create(
                    model="failover", messages=HELLO, max_tokens=24, logit_bias=NO_EOS
                )
                results.append("ok")
            except openai.APIError as exc:
                results.append(f"whole failed: {exc}")

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=env.front.base_url, api_key=env.token, max_retries=0)
        async with client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(16)]
            await asyncio.sleep(0.4)
            assert env.victim.proc is not None
            env.victim.proc.send_signal(signal.SIGKILL)
            tasks += [asyncio.create_task(one(client, i)) for i in range(16, 24)]
            await asyncio.gather(*tasks)

    asyncio.run(run())
    env.victim.proc.wait()  # type: ignore[union-attr]
    bad = [r for r in results if r not in ("ok", "cut")]
    assert not bad, results  # whole answers retried, streams cut only once they had begun
    assert results.count("ok") >= 20, results
    replicas = env.workers()["failover"]["replicas"]
    assert replicas[0]["state"] != "healthy" and replicas[0]["failures"] >= 1
    assert replicas[1]["state"] == "healthy"
    # the survivor takes the load
    for _ in range(3):
        env.client().chat.completions.create(model="failover", **CHAT)
    # and the ejected one comes back once it recovers
    env.victim.start(timeout=120)
    eventually(
        lambda: env.workers()["failover"]["replicas"][0]["state"] == "healthy",
        20,
        "the ejected replica healthy again",
    )
    assert env.victim.proc is not None


def test_the_workers_view_metrics_and_health_show_each_replica(env: Env) -> None:
    w = env.workers()["pair"]
    assert w["remote"] is True and w["model"] == "gemma"
    assert [r["url"] for r in w["replicas"]] == [r.url for r in env.pair]
    assert {"state", "in_flight", "requests", "failures", "last_latency_ms", "last_error"} <= set(
        w["replicas"][0]
    )
    table = cli_ok(env.state, "workers")
    assert "remote model worker pair (gemma)" in table and "last latency" in table
    with env.http() as http:
        metrics = http.get("/metrics").text
        models = http.get("/v1/models").json()["data"]
    assert f'vergeai:upstream_healthy{{assistant="pair",upstream="{env.pair[0].url}"}} 1.0' in (
        metrics
    )
    assert 'vergeai:upstream_requests_total{assistant="pair"' in metrics
    assert {m["id"]: m["model"] for m in models}["pair"] == "gemma"


def test_no_healthy_replica_is_a_503_and_health_says_degraded(env: Env) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cli_ok(env.state, "assistant", "create", "dead", "--upstream", dead,
           "--upstream-model", "m", "--health-interval", "0.5")  # fmt: skip
    try:
        eventually(lambda: env.workers().get("dead", {}).get("state") == "error", 10, "dead")
        health = httpx.get(env.front.root_url + "/health").json()
        assert health["status"] == "degraded"
        assert health["failed"]["dead"] == "its upstream server is not healthy"
        assert dead not in json.dumps(health)
        with env.http() as http:
            r = http.post("/v1/chat/completions", json={"model": "dead", **CHAT})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "upstream" in error_of(r)["message"] and dead not in r.text
    finally:
        cli_ok(env.state, "assistant", "delete", "dead", "--yes")
    eventually(lambda: httpx.get(env.front.root_url + "/health").json()["status"] == "ok", 5)


def test_the_upstream_key_from_env_or_secrets_file_and_never_written_anywhere(env: Env) -> None:
    client = env.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="badkey", **CHAT)
    assert caught.value.status_code == 502
    assert "upstream_key_env" in caught.value.message and "sk-wrong" not in caught.value.message
    assert client.chat.completions.create(model="filekey", **CHAT).choices[0].message.content
    secrets = env.state / "secrets.toml"
    secrets.chmod(0o644)  # readable by others: not used
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="filekey", **CHAT)
        assert caught.value.status_code == 502
        env.front.wait_logged("secrets.toml is readable by others")
    finally:
        secrets.chmod(0o600)
    listing = cli_ok(env.state, "workers", "--json") + cli_ok(env.state, "assistant", "list",
                                                               "--json")  # fmt: skip
    for key in (UPSTREAM_KEY, LLAMA_KEY, "sk-wrong"):
        assert key not in env.front.log() and key not in listing
        for path in env.state.rglob("*"):
            if path.is_file() and path.name != "secrets.toml":
                assert key.encode() not in path.read_bytes(), path


def test_messages_and_responses_reach_a_remote_assistant_completions_and_embeddings_refuse(
    env: Env,
) -> None:
    with env.http() as http:
        completions = http.post(
            "/v1/completions", json={"model": "direct", "prompt": "Hi", "max_tokens": 2}
        )
        embeddings = http.post("/v1/embeddings", json={"model": "direct", "input": "Hi"})
        anthropic = http.post(
            "/v1/messages",
            json={"model": "direct", "max_tokens": 4, "messages": HELLO},
        )
        responses = http.post(
            "/v1/responses", json={"model": "direct", "input": "Hi", "max_output_tokens": 4}
        )
        refused = http.post(
            "/v1/chat/completions",
            json={"model": "direct", **CHAT, "logit_bias": {"999999": 1}},
        )
    assert completions.status_code == 400 and "upstream" in error_of(completions)["message"]
    assert embeddings.status_code == 400
    assert anthropic.status_code == 200 and anthropic.json()["content"][0]["text"]
    assert responses.status_code == 200
    assert responses.json()["output"][-1]["content"][0]["text"]
    # the upstream's own 400, relayed with its status and message
    assert refused.status_code == 400 and "logit_bias" in error_of(refused)["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "ftp://h", "--upstream-model", "m"], "http:// or https://"),
        (["--upstream", "http://u:p@h", "--upstream-model", "m"], "no credentials"),
        (["--upstream", "http://h/?a=1", "--upstream-model", "m"], "no query"),
        (["--upstream", "http://h:70000", "--upstream-model", "m"], "port"),
        (["--upstream", "http://h"], "upstream_model"),
        (["--upstream", "http://h", "--upstream", "http://h", "--upstream-model", "m"], "twice"),
        (
            ["--upstream", "http://h", "--upstream-model", "m", "--upstream-key-env", "1X"],
            "environment variable",
        ),
        (["--upstream", "http://h", "--upstream-model", "m", "--embedding"], "chat"),
        (
            ["--upstream", "http://h", "--upstream-model", "m", "--health-interval", "0"],
            "between 0.5",
        ),
        (["--upstream", ",", "--upstream-model", "m"], "at least one URL"),
        (["--upstream-model", "m"], "GGUF file, or upstream"),
    ],
)
def test_bad_remote_assistant_settings_are_refused(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, out, err = run_cli(tmp_path / "s", "assistant", "create", "x", *args)
    assert code in (1, 2) and message in out + err, (code, out, err)
    assert (
        not (tmp_path / "s" / "assistants.toml").exists()
        or "x" not in (tmp_path / "s" / "assistants.toml").read_text()
    )


def test_edit_switches_between_local_and_remote(tmp_path: Path, model_path: str) -> None:
    state = tmp_path / "s"
    cli_ok(state, "assistant", "create", "a", "--upstream", "http://h:1", "--upstream",
           "http://h:2/v1", "--upstream-model", "m")  # fmt: skip
    code, _, err = run_cli(state, "assistant", "edit", "a", "--model", model_path)
    assert code == 1 and "not both" in err
    code, _, err = run_cli(state, "assistant", "edit", "a", "--upstream", "none")
    assert code == 1 and "GGUF" in err
    cli_ok(state, "assistant", "edit", "a", "--upstream", "none", "--model", model_path,
           "--chat-format", "gemma")  # fmt: skip
    shown = json.loads(cli_ok(state, "assistant", "list", "--json"))[0]
    assert shown["model"] == Path(model_path).stem and shown["upstream"] == []
    code, _, err = run_cli(state, "assistant", "edit", "a", "--upstream-model", "m")
    assert code == 1 and "upstream servers" in err
    cli_ok(state, "assistant", "edit", "a", "--upstream", "http://h:3,http://h:4",
           "--upstream-model", "m")  # fmt: skip
    shown = json.loads(cli_ok(state, "assistant", "show", "a", "--json"))
    assert shown["upstream"] == ["http://h:3", "http://h:4"] and shown["model"] == ""
    stored = (state / "assistants.toml").read_text()
    assert not re.search(r"^(model|threads|parallel) =", stored, re.M)  # a local model's
