"""What a decode step costs on this model and machine, learned from the steps decoded.

The scheduler sizes a prompt's chunk beside generating sequences from it: a
step that carries their next tokens and a piece of a long prompt should take
about :data:`STEP_TARGET`, the pause the prompt puts in their streams. A
fixed token count cannot do that: 128 prompt tokens take 0.3 s on a small
model on two CPU cores, seconds on a 7B one, milliseconds on a GPU. Larger
chunks decode the prompt more efficiently (each step also pays for the
weights' pass and for the generating sequences' own ubatch, which llama.cpp
splits from the prompt's), so the chunk is as large as the target allows.

Plain data; only the worker thread calls it.
"""

from __future__ import annotations

STEP_TARGET = 0.5  # seconds a step beside generating sequences may take
FIRST_CHUNK = 128  # prompt tokens beside generating sequences before any step is measured
MIN_CHUNK = 32  # below this a chunk's tokens cost much more each
WEIGHT = 0.2  # of each new measurement in the running estimates


class StepCost:
    """Running estimates of a prompt token's cost and of a read output's (a generating
    sequence's token or a draft token: each output's logits cost a pass over the
    vocabulary's weights)."""

    def __init__(self) -> None:
        self.per_token: float | None = None  # seconds per prompt token
        self.per_output: float | None = None  # seconds per output, in a step without prompt

    def record(self, prompt_tokens: int, outputs: int, seconds: float) -> None:
        """A decoded step: its prompt tokens, its outputs besides those, and its time."""
        if prompt_tokens == 0 and outputs:
            self.per_output = _blend(self.per_output, seconds / outputs)
        elif prompt_tokens >= MIN_CHUNK:
            prompt_seconds = seconds - outputs * (self.per_output or 0.0)
            self.per_token = _blend(self.per_token, max(prompt_seconds, 0.0) / prompt_tokens)

    def chunk(self, outputs: int, limit: int) -> int:
        """Prompt tokens for a step that also carries ``outputs`` generating tokens."""
        if self.per_token is None or self.per_token <= 0:
            return min(FIRST_CHUNK, limit)
        room = STEP_TARGET - outputs * (self.per_output or 0.0)
        return max(min(MIN_CHUNK, limit), min(limit, int(room / self.per_token)))


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - WEIGHT) * old + WEIGHT * new
