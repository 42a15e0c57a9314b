"""Hostile grammars and schemas through every constrained path, while another user streams.

One server (``gemma``, 2 slots): user ``victim`` streams answers one after
another the whole time, while user ``mallory`` sends grammars and schemas
made to hurt (deep, wide, ambiguous, unsatisfiable, empty languages, huge
lengths, item counts and repetitions, big enums, nested and recursive
``$ref``) through chat (``grammar``, ``response_format``, ``json_schema``,
tools forced and lazy, ``n`` 2, streaming), completions, Responses and
Anthropic Messages. What this promises, each a bound stated here:

- the process stays up, and every answer is a 200 or a 4xx in its API's shape;
- every victim stream ends whole, with no wait between two of its events
  longer than :data:`MAX_GAP` (on a quiet machine the longest is well under
  a second: a mask's work is bounded by llguidance's per-token fuel);
- the server's resident memory stays under :data:`MAX_RSS`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import HELLO, BackgroundStream, Server, cli_ok, free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_GAP = 10.0  # seconds between two events of the victim's stream
MAX_RSS = 2 * 1024**3  # bytes: the server idles near 0.7 GB with the demo model loaded
TOKENS = 6  # max_tokens of each hostile request

FUZZ = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# grammars that once killed or stalled the server (issue 25), and their kin
GRAMMARS = [
    "root ::= [\\x00]",  # no token can satisfy it: llama.cpp aborted
    'root ::= "a" [^\\x00-\\U0010FFFF]',
    'root ::= "a" root',  # an empty language
    'root ::= x\nx ::= "a" x "b" | "a" x "c"',  # ambiguous: llama.cpp's stacks doubled per token
    'root ::= x\nx ::= x x | "a"',
    'root ::= x\nx ::= "a" x "b" | "a" x "c" | "a"',
    'root ::= "a"{0,100000}',
    "root ::= [a-z]{100000000}",
    "root ::= " + "(" * 250 + '"a"' + ")" * 250,
    "root ::= " + " | ".join(f'"w{i}"' for i in range(5000)),
    "root ::= "
    + " ".join(f"r{i}" for i in range(300))
    + "\n"
    + "\n".join(f'r{i} ::= "x" | "y"' for i in range(300)),
    'root ::= "yes" | "no"',
]
COUNTS = st.sampled_from([0, 1, 2, 7, 100, 20_000, 100_000, 10**9])
PATTERNS = st.sampled_from(
    [
        "^[\\x00]$",
        "^a{100000000}$",
        "^[a-z]{0,100000}$",
        "^(a|aa)*$",
        "^(a*)*b$",
        "(",
        "^\\d{3}-\\d{4}$",
        "[\\u0000-\\uffff]{5}",
        "^(?=a)a$",
        "^\\p{L}+$",
    ]
)
BOUNDS = st.integers(-(10**20), 10**20) | st.sampled_from([-(2**63), -(2**63) + 1, 2**63 - 1])
RECURSIVE = {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#/$defs/node"}}]}
LEAVES = st.one_of(
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi}, COUNTS, COUNTS),
    st.builds(lambda p: {"type": "string", "pattern": p}, PATTERNS),
    st.builds(
        lambda lo, hi, m: {"type": "integer", "minimum": lo, "maximum": hi, "multipleOf": m},
        BOUNDS,
        BOUNDS,
        st.integers(1, 10**9) | st.sampled_from([2**63, 10**30]),
    ),
    st.builds(lambda n: {"enum": [f"value-{i}" for i in range(n)]}, st.sampled_from([0, 3, 9000])),
    st.sampled_from(
        [
            {"type": "boolean"},
            {"const": "x"},
            {"$ref": "#/$defs/node"},
            {"$ref": "#/$defs/no"},
            {"type": "string", "format": "date-time"},
            {},
            {"type": "number", "minimum": 1e308},
            {"not": {}},
            {"type": ["integer", "string"]},
            {"minimum": 5, "maximum": 1},
        ]
    ),
)
SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(
            lambda items, lo, hi: {"type": "array", "items": items, "minItems": lo, "maxItems": hi},
            inner,
            COUNTS,
            COUNTS,
        ),
        st.builds(
            lambda props: {"type": "object", "properties": props, "required": list(props)},
            st.dictionaries(st.text("abc", min_size=1, max_size=3), inner, max_size=4),
        ),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, min_size=1, max_size=6)),
        st.builds(lambda xs: {"allOf": xs}, st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=8,
).map(lambda schema: {"$defs": {"node": RECURSIVE}, **schema})
GBNF_ATOMS = st.sampled_from(['"a"', '"bc"', "[a-z]", "[^\\x00]", "[\\x00]", "x", "root", '""'])
GBNF = st.recursive(
    GBNF_ATOMS,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} {b}", inner, inner),
        st.builds(lambda a, b: f"({a} | {b})", inner, inner),
        st.builds(lambda a, op: f"({a}){op}", inner, st.sampled_from(["*", "+", "?"])),
        st.builds(lambda a, n: f"({a}){{{n},{n}}}", inner, st.sampled_from([0, 3, 5000, 10**6])),
    ),
    max_leaves=10,
).flatmap(lambda root: st.builds(lambda x: f"root ::= {root}\nx ::= {x}", GBNF_ATOMS))


def tool(schema: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/chat/completions", {"model": "gemma", "messages": HELLO, **fields}


def json_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# each constrained path: a grammar or schema to (path, body)
SCHEMA_PATHS: list[Callable[[Any], tuple[str, dict[str, Any]]]] = [
    lambda s: chat(response_format=json_format(s)),
    lambda s: chat(json_schema=s, stream=True),
    lambda s: chat(json_schema=s, n=2),
    lambda s: chat(tools=[tool(s)], tool_choice="required"),
    lambda s: chat(tools=[tool(s)], tool_choice={"type": "function", "function": {"name": "f"}}),
    lambda s: chat(tools=[tool(s)], tool_choice="auto"),
    lambda s: ("/v1/completions", {"model": "gemma", "prompt": "JSON:", "json_schema": s}),
    lambda s: (
        "/v1/responses",
        {
            "model": "gemma",
            "input": "Hello",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": s}},
        },
    ),
    lambda s: (
        "/v1/messages",
        {
            "model": "gemma",
            "messages": HELLO,
            "tool_choice": {"type": "any"},
            "tools": [{"name": "f", "input_schema": s}],
        },
    ),
]
GRAMMAR_PATHS: list[Callable[[Any], tuple[str, dict[str, Any]]]] = [
    lambda g: chat(grammar=g),
    lambda g: chat(grammar=g, stream=True, n=2),
    lambda g: ("/v1/completions", {"model": "gemma", "prompt": "Say:", "grammar": g}),
]


@dataclass
class Arena:
    server: Server
    mallory: str
    victim: str
    rss_peak: int = 0
    streams: list[BackgroundStream] = field(default_factory=list)

    def rss(self) -> int:
        assert self.server.proc is not None
        status = Path(f"/proc/{self.server.proc.pid}/status").read_text()
        kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        self.rss_peak = max(self.rss_peak, int(kb) * 1024)
        return int(kb) * 1024

    def send(self, path: str, body: dict[str, Any]) -> None:
        body = {**body, "max_tokens": TOKENS}
        headers = {"Authorization": f"Bearer {self.mallory}"}
        response = httpx.post(self.server.root_url + path, json=body, headers=headers, timeout=120)
        assert response.status_code in (200, 400), (response.status_code, response.text[:300])
        if response.status_code == 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"], error
        elif body.get("stream"):  # a grammar that ends mid-answer ends the stream with an error
            assert response.text.rstrip().endswith(("data: [DONE]", "}")), response.text[-300:]
        self.rss()


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Arena]:
    root = tmp_path_factory.mktemp("grammar-fuzz")
    state = root / "state"
    cli_ok(state, "user", "create", "mallory")
    cli_ok(state, "user", "create", "victim")
    cli_ok(
        state,
        "assistant",
        "create",
        "gemma",
        "--model",
        model_path,
        "--chat-format",
        "gemma",
        "--threads",
        "2",
        "--ctx",
        "1024",
        "--parallel",
        "3",
    )
    mallory = cli_ok(state, "key", "create", "--user", "mallory", "--name", "k").strip()
    victim = cli_ok(state, "key", "create", "--user", "victim", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    arena = Arena(server, mallory, victim)
    stop = threading.Event()

    def stream_on() -> None:
        while not stop.is_set():
            stream = BackgroundStream(server.root_url, victim, "gemma", max_tokens=48)
            arena.streams.append(stream)
            stream.start()
            stream.join(timeout=300)

    streamer = threading.Thread(target=stream_on, daemon=True)
    streamer.start()
    try:
        yield arena
    finally:
        stop.set()
        streamer.join(timeout=300)
        server.stop()


def test_the_grammars_that_killed_or_stalled_the_server(arena: Arena) -> None:
    for grammar in GRAMMARS:
        for path in GRAMMAR_PATHS:
            arena.send(*path(grammar))
    schemas = [
        {"type": "string", "maxLength": 100000},
        {"type": "string", "maxLength": 20000},
        {"type": "array", "maxItems": 100000},
        {"type": "string", "pattern": "^[a-z]{0,100000}$"},
        {"type": "string", "pattern": "^[\\x00]$"},
        {"type": "string", "pattern": "^a{100000000}$"},
        {"enum": [f"value-{i:05d}-{'x' * 8}" for i in range(10000)]},
        {"type": "integer", "minimum": -(2**63), "maximum": -(2**63)},  # segfaulted llguidance
    ]
    for i, schema in enumerate(schemas):  # each schema on 3 paths, every path on some
        for path in SCHEMA_PATHS[i % 3 :: 3]:
            arena.send(*path(schema))


def test_generated_schemas_on_every_path(arena: Arena) -> None:
    @FUZZ
    @given(schema=SCHEMAS, path=st.sampled_from(SCHEMA_PATHS))
    def run(schema: Any, path: Callable[[Any], tuple[str, dict[str, Any]]]) -> None:
        arena.send(*path(schema))

    run()


def test_generated_grammars(arena: Arena) -> None:
    @FUZZ
    @given(grammar=GBNF, path=st.sampled_from(GRAMMAR_PATHS))
    def run(grammar: str, path: Callable[[Any], tuple[str, dict[str, Any]]]) -> None:
        arena.send(*path(grammar))

    run()


def test_the_other_user_never_waited_and_memory_stayed_bounded(arena: Arena) -> None:
    """Runs last: every victim stream that ran beside the tests above."""
    assert arena.server.proc is not None and arena.server.proc.poll() is None
    finished = [s for s in arena.streams if not s.thread.is_alive()]
    assert len(finished) >= 3, "the victim hardly streamed"
    for stream in finished:
        assert stream.completed(), (stream.status, stream.error, stream.events[-2:])
        assert stream.longest_gap() < MAX_GAP, stream.longest_gap()
    assert arena.rss_peak < MAX_RSS, arena.rss_peak
    health = httpx.get(arena.server.root_url + "/health").json()
    assert health["status"] == "ok", health
    print(
        f"victim streams {len(finished)}, longest gap "
        f"{max(s.longest_gap() for s in finished):.2f} s, peak RSS {arena.rss_peak / 2**20:.0f} MiB"
    )
