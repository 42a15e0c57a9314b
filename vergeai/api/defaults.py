"""Sampling for a request: what it asks, else the assistant's defaults, else llama-server's."""

from __future__ import annotations

from vergeai.api.fields import Sampled
from vergeai.runtime.constraint import Grammar
from vergeai.runtime.sampling import Sampling
from vergeai.state.assistants import Assistant

# llama-server's sampling defaults, used when neither request nor assistant sets one
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_MAX_TOKENS = 2048


def sampling_for(
    req: Sampled, assistant: Assistant, choice: int = 0, grammar: Grammar | None = None
) -> Sampling:
    """The request's sampling over the assistant's defaults; choice i of n seeds with seed+i."""

    def pick(value: float | None, default: float | None, fallback: float) -> float:
        return value if value is not None else default if default is not None else fallback

    return Sampling(
        temperature=pick(req.temperature, assistant.temperature, DEFAULT_TEMPERATURE),
        top_p=pick(req.top_p, assistant.top_p, DEFAULT_TOP_P),
        top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
        min_p=DEFAULT_MIN_P if req.min_p is None else req.min_p,
        seed=None if req.seed is None else (req.seed + choice) % 2**32,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
        repeat_last_n=req.repeat_last_n,
        logit_bias=req.logit_bias,
        grammar=grammar,
    )


def max_tokens_for(req: Sampled, assistant: Assistant) -> int:
    """The request's max_tokens, else the assistant's, else llama-server's default."""
    return req.max_tokens or assistant.max_tokens or DEFAULT_MAX_TOKENS
