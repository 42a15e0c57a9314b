"""Greedy sampling's argmax path picks what llama.cpp's native greedy chain picks.

On the real model's logits: every output of a 280-token prompt, with and
without logit biases (negative, positive, too small to change a float), and
with a NaN where the best logit was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from vergeai.runtime.constraint import GrammarSpec, compile_grammar
from vergeai.runtime.context import Context
from vergeai.runtime.llama import Model
from vergeai.runtime.sampler import Sampler, build_sampler, free_sampler
from vergeai.runtime.sampling import Sampling

GREEDY = Sampling(
    temperature=0.0, top_p=1.0, top_k=40, min_p=0.05, seed=None, presence_penalty=0.0,
    frequency_penalty=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias={},
)  # fmt: skip


@pytest.fixture(scope="module")
def decoded(model_path: str) -> Iterator[tuple[Model, Context, int]]:
    model = Model(model_path, 0)
    ctx = Context(model, 512, 1, 2)
    text = "The keeper climbed the tower, lit the lamp and watched the boats come home. " * 20
    tokens = model.tokenize(text)[:280]
    assert ctx.decode([(t, i, 0, True) for i, t in enumerate(tokens)]) == 0
    yield model, ctx, len(tokens)
    ctx.free()
    model.free()


def picks(ctx: Context, sampler: Sampler, n: int) -> list[int]:
    return [ctx.sample(sampler, i) for i in range(n)]


@pytest.mark.parametrize(
    "bias",
    [{}, {1: -100.0, 506: -100.0}, {108: 6.0, 528: 2.5, 107: -1e-9}],
    ids=["none", "banned", "mixed"],
)
def test_argmax_path_picks_the_native_greedy_token(
    decoded: tuple[Model, Context, int], bias: dict[int, float]
) -> None:
    model, ctx, n = decoded
    sampler = build_sampler(model, replace(GREEDY, logit_bias=bias), 512)
    try:
        assert sampler.argmax is not None
        fast = picks(ctx, sampler, n)
        native = picks(ctx, Sampler(sampler.chain), n)
        assert fast == native
        assert len(set(native)) > 10  # many different tokens, not one answer
        unbiased = build_sampler(model, GREEDY, 512)
        changed = sum(a != b for a, b in zip(fast, picks(ctx, unbiased, n), strict=True))
        free_sampler(unbiased)
        assert (changed > 0) == bool(bias)  # the biases changed some picks
    finally:
        free_sampler(sampler)


def test_a_nan_logit_is_skipped_as_the_native_chain_does(
    decoded: tuple[Model, Context, int],
) -> None:
    model, ctx, n = decoded
    sampler = build_sampler(model, GREEDY, 512)
    try:
        logits = ctx.logits(n - 1)  # llama.cpp's own buffer
        best = int(np.argmax(logits))
        saved = float(logits[best])
        logits[best] = np.nan
        try:
            fast = ctx.sample(sampler, n - 1)
            assert fast == ctx.sample(Sampler(sampler.chain), n - 1)
            assert fast != best
        finally:
            logits[best] = saved
    finally:
        free_sampler(sampler)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"repeat_penalty": 1.1},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {10**7: -1.0}},
    ],
    ids=["temperature", "repeat", "presence", "frequency", "bias-out-of-range"],
)
def test_only_a_plain_greedy_chain_takes_the_argmax_path(
    decoded: tuple[Model, Context, int], change: dict[str, object]
) -> None:
    model, _, _ = decoded
    sampler = build_sampler(model, replace(GREEDY, **change), 512)  # type: ignore[arg-type]
    try:
        assert sampler.argmax is None
    finally:
        free_sampler(sampler)
    penalties_unused = replace(GREEDY, repeat_penalty=1.3, repeat_last_n=0)
    plain = build_sampler(model, penalties_unused, 512)
    try:
        assert plain.argmax is not None
    finally:
        free_sampler(plain)


def test_a_grammar_masks_the_logits_before_either_path(decoded: tuple[Model, Context, int]) -> None:
    """The mask comes first, so the argmax path and the native chain pick an allowed token."""
    model, ctx, n = decoded
    spec = GrammarSpec("gbnf", 'root ::= "yes" | "no"', "grammar")
    grammar = compile_grammar(model.grammar_tokenizer(), spec, {})
    logits = ctx.logits(n - 1)
    saved = logits.copy()
    greedy, warm = (
        build_sampler(model, GREEDY, 512),
        build_sampler(model, replace(GREEDY, temperature=1.0, seed=7), 512),
    )
    try:
        for sampler in (greedy, Sampler(greedy.chain), warm):
            grammar.start().mask(logits)
            token = ctx.sample(sampler, n - 1)
            assert model.piece(token) in (b"y", b"ye", b"yes", b"n", b"no"), model.piece(token)
            logits[:] = saved
    finally:
        logits[:] = saved
        free_sampler(greedy)
        free_sampler(warm)


def test_pieces_are_right_when_threads_ask_for_them_at_once(
    decoded: tuple[Model, Context, int],
) -> None:
    # two assistants on one GGUF share its Model, and echo detokenizes on the event loop
    # while a worker thread reports tokens: a shared scratch buffer gave ' How' as 'ohow'
    model = decoded[0]
    tokens = list(range(min(model.n_vocab, 20_000)))
    truth = [model.piece(t) for t in tokens]
    wrong: list[int] = []

    def read() -> None:
        for _ in range(10):
            wrong.extend(t for t in tokens if model.piece(t) != truth[t])

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_context_refuses_every_thread_but_its_own(decoded: tuple[Model, Context, int]) -> None:
    ctx = decoded[1]
    refused: list[str] = []

    def touch() -> None:
        for call in (lambda: ctx.logits(0), lambda: ctx.decode([]), lambda: ctx.clear_from(0, 0)):
            try:
                call()
            except RuntimeError as exc:
                refused.append(str(exc))

    thread = threading.Thread(target=touch)
    thread.start()
    thread.join()
    assert len(refused) == 3 and "only by the thread that made it" in refused[0]
    assert ctx.logits(0).shape == (decoded[0].n_vocab,)  # its own thread still may
