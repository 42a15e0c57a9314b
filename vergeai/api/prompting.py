"""Prompts for a model loaded here, read through its facts: render, bound, check.

Plain functions over :class:`~vergeai.runtime.engine.ModelFacts`, called on
the event loop (or a thread of it): the vocabulary is safe from any thread,
and the template is plain data once the model is loaded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from vergeai.api.fields import Sampled
from vergeai.errors import ContextOverflow, InvalidRequest
from vergeai.runtime.constraint import Grammar, GrammarSpec, compile_grammar
from vergeai.runtime.engine import ModelFacts
from vergeai.runtime.prompt import Message
from vergeai.runtime.reasoning import close_open_think, prompt_opens_think


@dataclass
class Rendered:
    text: str
    tokens: list[int]
    opens_think: bool  # the prompt leaves a <think> block open: output starts as reasoning


def render(
    facts: ModelFacts,
    messages: list[Message],
    enable_thinking: bool | None,
    tools: list[dict[str, Any]] | None = None,
    continue_final: bool = False,
) -> Rendered:
    """Messages (and tools) to prompt tokens, thinking switched as asked where it can be.

    A template without an enable_thinking switch that opens a think block
    itself gets that block closed empty when thinking is off.
    ``continue_final``: the final assistant message is continued, not closed.
    """
    template = facts.template
    assert template is not None  # a chat model's facts carry its template
    text = template.render(
        messages, enable_thinking=enable_thinking, tools=tools, continue_final=continue_final
    )
    if enable_thinking is False and not template.supports_thinking:
        text = close_open_think(text)
    return Rendered(text, facts.model.tokenize(text), prompt_opens_think(text))


def check_prompt(facts: ModelFacts, tokens: list[int], param: str = "messages") -> None:
    """A prompt must leave room in the context for at least one generated token."""
    if len(tokens) >= facts.n_ctx:
        raise ContextOverflow(
            f"the request has {len(tokens)} prompt tokens, more than the assistant's "
            f"context of {facts.n_ctx} tokens allows",
            param=param,
            extra={"n_prompt_tokens": len(tokens), "n_ctx": facts.n_ctx},
        )


async def check_request(
    facts: ModelFacts, req: Sampled, spec: GrammarSpec | None
) -> Grammar | None:
    """What only the loaded model can tell: token ids in range; the grammar compiled.

    Called once the caller has passed its limits' first check: compiling
    takes time and memory (bounded), off the event loop.
    """
    model = facts.model
    if any(t >= model.n_vocab for t in req.logit_bias):
        raise InvalidRequest(
            f"'logit_bias': token ids must be below the vocabulary size {model.n_vocab}",
            param="logit_bias",
        )
    if spec is None:
        return None

    def compiled() -> Grammar:
        specials = model.special_tokens(spec.markers)
        return compile_grammar(model.grammar_tokenizer(), spec, specials)

    return await asyncio.to_thread(compiled)
