"""POST /v1/embeddings from an embedding assistant on the demo model, through real clients.

The demo model has no pooling type of its own, so its embeddings are the
mean of its token outputs, L2-normalised.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from helpers import Server, cli_ok, error_of, free_port

from vergeai.runtime.llama import Model

CAT, FELINE, TAX = "The cat sat on the mat.", "A feline rested on the rug.", "Tax filings are due."


@dataclass
class Env:
    server: Server
    token: str
    model: Model  # the demo GGUF, for its tokenizer and sizes

    def client(self) -> openai.OpenAI:
        return self.server.client(self.token)

    def post(self, **body: Any) -> httpx.Response:
        with self.server.http(self.token) as http:
            return http.post("/v1/embeddings", json={"model": "emb", **body})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("embeddings")
    state = root / "state"
    cli_ok(state, "user", "create", "u")
    common = ["--model", model_path, "--threads", "2", "--ctx", "128"]
    cli_ok(state, "model", "add", "emb", "--file", model_path, "--threads", "2", "--ctx", "128",
           "--embedding", "--parallel", "2")  # fmt: skip
    cli_ok(state, "assistant", "create", "emb", "--model", "emb")  # loaded on demand
    cli_ok(state, "assistant", "create", "gemma", *common, "--chat-format", "gemma")
    token = cli_ok(state, "key", "create", "--user", "u", "--name", "k").strip()
    server = Server(state_dir=state, port=free_port(), log_path=root / "serve.log")
    server.start(timeout=120)
    model = Model(model_path, 0)
    try:
        yield Env(server, token, model)
    finally:
        model.free()
        server.stop()


def vectors(reply: Any) -> np.ndarray[Any, Any]:
    return np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])


def test_embeddings_are_normalised_and_mean_something(env: Env) -> None:
    reply = env.client().embeddings.create(model="emb", input=[CAT, FELINE, TAX])
    v = vectors(reply)
    assert v.shape == (3, env.model.n_embd)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    similarity = v @ v.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # cat~feline, not cat~tax
    assert reply.usage.prompt_tokens == sum(
        len(env.model.tokenize(t, add_special=True)) for t in (CAT, FELINE, TAX)
    )
    assert reply.model == "emb"


def test_float_and_base64_agree(env: Env) -> None:
    # the openai client asks for base64 unless told otherwise, and decodes it
    as_base64 = vectors(env.client().embeddings.create(model="emb", input=CAT))
    as_float = vectors(env.client().embeddings.create(model="emb", input=CAT,
                                                      encoding_format="float"))  # fmt: skip
    assert np.allclose(as_base64, as_float, atol=1e-6)
    raw = env.post(input=CAT, encoding_format="base64").json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert np.allclose(decoded, as_float[0], atol=1e-6)


def test_token_inputs_are_the_same_inputs(env: Env) -> None:
    tokens = env.model.tokenize(CAT, add_special=True)
    by_text = env.post(input=CAT, encoding_format="float").json()["data"][0]["embedding"]
    by_tokens = env.post(input=tokens, encoding_format="float").json()["data"][0]["embedding"]
    several = env.post(input=[tokens, tokens[:3]], encoding_format="float").json()["data"]
    assert np.allclose(by_text, by_tokens, atol=1e-5)
    assert np.allclose(several[0]["embedding"], by_text, atol=1e-5)
    assert not np.allclose(several[1]["embedding"], by_text, atol=1e-3)


def test_many_inputs_come_back_in_order(env: Env) -> None:
    texts = [f"Item number {i} is {'red' if i % 2 else 'blue'}." for i in range(40)]
    reply = env.post(input=texts, encoding_format="float").json()
    assert [d["index"] for d in reply["data"]] == list(range(40))
    alone = env.post(input=texts[17], encoding_format="float").json()["data"][0]["embedding"]
    # decoded in a batch with others its floats differ a little, but it is the closest one
    similarity = np.array([d["embedding"] for d in reply["data"]]) @ np.array(alone)
    assert int(np.argmax(similarity)) == 17 and similarity[17] > 0.999


def test_every_field_while_another_request_embeds(env: Env) -> None:
    tokens = env.model.tokenize(TAX, add_special=True)
    fields = {"input": [CAT, tokens], "encoding_format": "base64",
              "dimensions": env.model.n_embd, "user": "alice", "keep_alive": "45m"}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(env.post, input=[f"Line {i} of a long list." for i in range(24)])
        response = env.post(**fields)
        assert response.status_code == 200, response.text
        assert other.result().status_code == 200
    assert len(response.json()["data"]) == 2
    assert env.post(input=CAT, keep_alive="45m").status_code == 200  # alone: it is the last
    snapshot = json.loads(cli_ok(env.server.state_dir, "workers", "--json"))
    unloads_in = snapshot["model_info"]["emb"]["unloads_in_seconds"]
    assert 2600 < unloads_in <= 2700  # the request's keep_alive, not the model's 900 s


def test_langchain_embeddings(env: Env) -> None:
    from langchain_openai import OpenAIEmbeddings

    # (without check_embedding_ctx_length=False LangChain sends tiktoken's token ids)
    lc = OpenAIEmbeddings(model="emb", base_url=env.server.base_url, api_key=env.token,  # type: ignore[arg-type]
                          check_embedding_ctx_length=False)  # fmt: skip
    docs = lc.embed_documents([CAT, TAX])
    query = lc.embed_query(FELINE)
    assert len(docs) == 2 and len(query) == env.model.n_embd
    assert np.dot(query, docs[0]) > np.dot(query, docs[1])


def test_models_say_which_kind(env: Env) -> None:
    with env.server.http(env.token) as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["emb"]["kind"] == "embedding" and models["gemma"]["kind"] == "chat"
    assert models["emb"]["context_length"] == 128
    meta = models["gemma"]["meta"]
    assert meta["n_vocab"] == env.model.n_vocab and meta["n_ctx_train"] >= 1024
    assert meta["n_params"] > 1e8 and meta["size"] > 1e8


# wrong, missing, huge and hostile input


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "input"),
        ({"input": None}, "input"),
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": [""]}, "input[0]"),
        ({"input": [[]]}, "input[0]"),
        ({"input": [1.5]}, "input[0]"),
        ({"input": ["a", 3]}, "input[1]"),
        ({"input": [[1, 2], "a", {}]}, "input[2]"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": [2, 10**9]}, "input"),
        ({"input": ["a", [2, -1]]}, "input[1]"),
        ({"input": ["a", "word " * 400]}, "input[1]"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "a", "dimensions": 5}, "dimensions"),
        ({"input": "a", "keep_alive": "soon"}, "keep_alive"),
        ({"input": "a", "model": ""}, "model"),
        ({"input": "a", "model": "gemma"}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_field(env: Env, body: dict[str, Any], param: str) -> None:
    response = env.post(**body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_the_other_kind_of_request_is_refused(env: Env) -> None:
    with env.server.http(env.token) as http:
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "emb", "messages": [{"role": "user", "content": "x"}]},
        )
        completion = http.post("/v1/completions", json={"model": "emb", "prompt": "x"})
        missing = http.post("/v1/embeddings", json={"model": "nobody", "input": "x"})
    for response in (chat, completion):
        assert response.status_code == 400
        assert "embedding assistant" in error_of(response)["message"]
    assert missing.status_code == 404
    full = env.post(input="a", dimensions=env.model.n_embd)
    assert full.status_code == 200
