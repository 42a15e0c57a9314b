"""Property-based fuzzing of /v1/chat/completions and /v1/models on the real server.

Fixed seed (derandomized) and a bounded number of examples. Whatever the
input: never a 5xx, every error in the OpenAI shape with an x-request-id,
and the server still answers a normal request afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers import HELLO, Server, cli_ok, error_of, free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vergeai.api.access import REQUEST_ID_RE
from vergeai.api.completions import COMPLETION_FIELDS
from vergeai.api.embeddings import EMBEDDING_FIELDS
from vergeai.api.schemas import CHAT_FIELDS

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
NASTY_TEXT = st.text(
    alphabet=st.characters(exclude_categories=()),  # lone surrogates and controls included
    max_size=40,
) | st.sampled_from(["\ud800", "\udfff", "a\x00b", "\n\r", "\u202e", "gemma\n", "gemma", ""])
HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**4000, -(10**300)])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | NASTY_TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(sorted(f.name for f in CHAT_FIELDS)) | NASTY_TEXT
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | VALUES},
    optional={"content": VALUES, "name": VALUES, "tool_calls": VALUES},
)
RAW_BODIES = st.sampled_from(
    [
        b'{"model": "gemma", "model": "gemma", "messages": []}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "x"}], "seed": Infinity}',
        b'{"model": "gemma", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "\\udfff", "messages": []}',
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"model": "gemma", "messages": [' + b'{"role": "user", "content": "a"},' * 3 + b"]}",
        b"\xef\xbb\xbf{}",
        b"\x00" * 64,
        b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    ]
) | st.binary(max_size=200)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "multipart/form-data; boundary=x", "", "text/json; x=y"]
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    state = root / "state"
    cli_ok(state, "user", "create", "root", "--role", "admin")
    # a small context and answer budget keep every accepted request short
    cli_ok(state, "assistant", "create", "gemma", "--model", model_path, "--chat-format", "gemma",
           "--threads", "2", "--ctx", "256", "--parallel", "2", "--max-tokens", "4")  # fmt: skip
    cli_ok(state, "assistant", "create", "emb", "--model", model_path, "--embedding",
           "--threads", "2", "--ctx", "64")  # fmt: skip
    token = cli_ok(state, "key", "create", "--user", "root", "--name", "fuzz").strip()
    (root / "token").write_text(token)
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def token_of(server: Server) -> str:
    return (Path(server.state_dir).parent / "token").read_text()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers.get("x-request-id")
    if response.status_code >= 400:
        err = (
            response.json()["error"] if "/v1/messages" in str(response.url) else error_of(response)
        )
        assert isinstance(err["message"], str) and err["message"]


def post_raw(server: Server, raw: bytes, content_type: str = "application/json") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token_of(server)}"}
    if content_type:
        headers["Content-Type"] = content_type
    return httpx.post(
        f"{server.base_url}/chat/completions", content=raw, headers=headers, timeout=60
    )


def to_json(value: Any) -> bytes:
    # surrogatepass: lone surrogates reach the server as \ud800 escapes, as a hostile client sends
    return json.dumps(value).encode("utf-8", "surrogatepass")


def normal_request_works(server: Server) -> None:
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 2}
    response = post_raw(server, to_json(body))
    assert response.status_code == 200, response.text


def test_one_field_replaced_by_anything(fuzz_server: Server) -> None:
    @FUZZ
    @given(field=FIELD_NAMES, value=VALUES, stream=st.booleans())
    def run(field: str, value: Any, stream: bool) -> None:
        body = {"model": "gemma", "messages": HELLO, "stream": stream, field: value}
        check(post_raw(fuzz_server, to_json(body)))

    run()
    normal_request_works(fuzz_server)


def test_messages_of_any_shape(fuzz_server: Server) -> None:
    @FUZZ
    @given(messages=st.lists(MESSAGE, max_size=4) | VALUES)
    def run(messages: Any) -> None:
        check(post_raw(fuzz_server, to_json({"model": "gemma", "messages": messages})))

    run()
    normal_request_works(fuzz_server)


def test_raw_bodies_and_content_types(fuzz_server: Server) -> None:
    @FUZZ
    @given(raw=RAW_BODIES, content_type=CONTENT_TYPES)
    def run(raw: bytes, content_type: str) -> None:
        check(post_raw(fuzz_server, raw, content_type))

    run()
    normal_request_works(fuzz_server)


# the other endpoints: a valid body, then one field replaced by anything
OTHERS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/completions": ({"model": "gemma", "prompt": "Hi", "max_tokens": 2},
                     sorted(f.name for f in COMPLETION_FIELDS)),
    "/embeddings": ({"model": "emb", "input": "Hi"}, sorted(f.name for f in EMBEDDING_FIELDS)),
    "/messages": ({"model": "gemma", "max_tokens": 2, "messages": HELLO},
                  ["max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p",
                   "top_k", "stream", "thinking", "tools", "tool_choice", "metadata"]),
    "/responses": ({"model": "gemma", "input": "Hi", "max_output_tokens": 2},
                   ["input", "instructions", "max_output_tokens", "temperature", "top_p",
                    "stream", "store", "previous_response_id", "tools", "tool_choice", "text",
                    "reasoning", "parallel_tool_calls", "metadata"]),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(OTHERS))
def test_other_endpoints_with_one_field_replaced(fuzz_server: Server, path: str) -> None:
    base, fields = OTHERS[path]
    headers = {"Authorization": f"Bearer {token_of(fuzz_server)}"}

    @settings(FUZZ, max_examples=60)  # the request path after parsing is chat's, fuzzed above
    @given(field=st.sampled_from(fields) | NASTY_TEXT, value=VALUES)
    def run(field: str, value: Any) -> None:
        raw = to_json({**base, field: value})
        check(httpx.post(f"{fuzz_server.base_url}{path}", content=raw, headers=headers,
                         timeout=60))  # fmt: skip

    run()
    ok = httpx.post(f"{fuzz_server.base_url}{path}", json=base, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text


# what a client library lets through: latin-1 text without edge whitespace
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
).map(lambda text: text.strip(" \t"))


def test_models_and_headers(fuzz_server: Server) -> None:
    @FUZZ
    @given(
        path=st.text(max_size=30),
        auth=st.none() | HEADER_TEXT | st.just("Bearer " + "x" * 300),
        request_id=st.none() | HEADER_TEXT,
        query=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    )
    def run(path: str, auth: str | None, request_id: str | None, query: dict[str, str]) -> None:
        headers = {"Authorization": f"Bearer {token_of(fuzz_server)}".encode()}
        if auth is not None:
            headers["Authorization"] = auth.encode("latin-1")
        if request_id is not None:
            headers["X-Request-ID"] = request_id.encode("latin-1")
        quoted = quote(path.encode("utf-8", "surrogatepass"), safe="")
        for url in (f"{fuzz_server.base_url}/models", f"{fuzz_server.base_url}/models/{quoted}"):
            response = httpx.get(url, headers=headers, params=query, timeout=30)
            check(response)
            if request_id is not None and REQUEST_ID_RE.fullmatch(request_id):
                assert response.headers["x-request-id"] == request_id
            else:
                assert len(response.headers["x-request-id"]) == 32

    run()
    normal_request_works(fuzz_server)
    metrics = httpx.get(
        f"{fuzz_server.root_url}/metrics",
        headers={"Authorization": f"Bearer {token_of(fuzz_server)}"},
    )
    assert metrics.status_code == 200
