"""Log-probabilities of generated tokens in the OpenAI shape, from the model's own distribution.

Taken from the logits before any sampler (temperature, penalties, biases,
grammar) touches them, as OpenAI reports them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vergeai.runtime.llama import Model


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - float(logits.max())
    result: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum())
    return result


def entry(model: Model, logprobs: npt.NDArray[np.float64], token: int, top: int) -> dict[str, Any]:
    """``{"token", "logprob", "bytes", "top_logprobs"}`` for the chosen token."""
    chosen = _item(model, logprobs, token)
    best: list[int] = []
    if top > 0:
        candidates = np.argpartition(logprobs, -top)[-top:]
        best = sorted((int(t) for t in candidates), key=lambda t: -logprobs[t])
    chosen["top_logprobs"] = [_item(model, logprobs, t) for t in best]
    return chosen


def _item(model: Model, logprobs: npt.NDArray[np.float64], token: int) -> dict[str, Any]:
    piece = model.piece(token)
    return {
        "token": piece.decode("utf-8", "replace"),
        "logprob": float(logprobs[token]),
        "bytes": list(piece),
    }
