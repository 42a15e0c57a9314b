"""What a decode step costs on this model and machine, learned from the steps decoded.

Two decisions come from it:

- **Prompt chunks.** A step that carries generating sequences' next tokens
  and a piece of a long prompt should take about :data:`STEP_TARGET`, the
  pause the prompt puts in their streams. A fixed token count cannot do
  that: 128 prompt tokens take 0.3 s on a small model on two CPU cores,
  seconds on a 7B one, milliseconds on a GPU. Larger chunks decode a prompt
  more efficiently, so the chunk is as large as the target allows.
- **Draft length.** Each output whose logits are read (a generating token, a
  draft token) costs a pass over the vocabulary's weights, on top of the
  step's fixed cost. A draft kept whole gives ``d + 1`` tokens for
  ``fixed + (d + 1) * per_output``; past the length where the fixed cost is a
  tenth of that, a longer draft gains little and loses more when it misses.
  On two CPU cores and the demo model that is 10 tokens; on a GPU,
  where the fixed cost dominates, far more.

Plain data; only the worker thread calls it.
"""

from __future__ import annotations

STEP_TARGET = 0.5  # seconds a step beside generating sequences may take
FIRST_CHUNK = 128  # prompt tokens beside generating sequences before any step is measured
MIN_CHUNK = 32  # below this a chunk's tokens cost much more each
WEIGHT = 0.2  # of each new measurement in the prompt token's running estimate
OUTPUT_MEMORY = 0.98  # how much of the output-cost fit each new step keeps
FIXED_SHARE = 0.1  # of a whole draft's step, the fixed cost may be at most this much
UNKNOWN_DRAFT = 8  # the longest draft before the output costs are known


class StepCost:
    """Running estimates: a prompt token's cost, and a step of outputs as ``fixed +
    per_output * n`` (a least-squares fit over recent steps without a prompt)."""

    def __init__(self) -> None:
        self.per_token: float | None = None  # seconds per prompt token
        self._sums = [0.0] * 5  # weights, n, n², t, n·t of output-only steps

    def record(self, prompt_tokens: int, outputs: int, seconds: float) -> None:
        """A decoded step: its prompt tokens, its outputs besides those, and its time."""
        if prompt_tokens == 0 and outputs:
            n = float(outputs)
            new = (1.0, n, n * n, seconds, n * seconds)
            self._sums = [OUTPUT_MEMORY * a + b for a, b in zip(self._sums, new, strict=True)]
        elif prompt_tokens >= MIN_CHUNK:
            prompt_seconds = seconds - self.outputs(outputs)
            new = max(prompt_seconds, 0.0) / prompt_tokens
            self.per_token = new if self.per_token is None else _blend(self.per_token, new)

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_output) seconds, once steps of different output counts were seen."""
        w, n, nn, t, nt = self._sums
        spread = w * nn - n * n  # w² times the variance of the output counts
        if w <= 0 or spread <= 0.01 * w * w:
            return None
        per_output = (w * nt - n * t) / spread
        fixed = (t - per_output * n) / w
        if per_output <= 0:
            return None
        return max(fixed, 0.0), per_output

    def outputs(self, n: int) -> float:
        """Seconds that ``n`` outputs add to a step (0 before anything is measured)."""
        if n == 0 or self._sums[0] <= 0:
            return 0.0
        fit = self.fit()
        if fit is not None:
            return fit[0] + fit[1] * n
        _, total_n, _, t, _ = self._sums
        return t / total_n * n  # one count seen: each output at the average step's share

    def chunk(self, outputs: int, limit: int) -> int:
        """Prompt tokens for a step that also carries ``outputs`` generating tokens."""
        if self.per_token is None or self.per_token <= 0:
            return min(FIRST_CHUNK, limit)
        room = STEP_TARGET - self.outputs(outputs)
        return max(min(MIN_CHUNK, limit), min(limit, int(room / self.per_token)))

    def longest_draft(self) -> int:
        """The longest draft worth decoding: past it a fully kept draft's rate gains
        less than a tenth, while a missed one costs more (see the module's text)."""
        fit = self.fit()
        if fit is None:
            return UNKNOWN_DRAFT
        fixed, per_output = fit
        return round(fixed / (FIXED_SHARE * per_output)) - 1


def _blend(old: float, new: float) -> float:
    return (1 - WEIGHT) * old + WEIGHT * new
