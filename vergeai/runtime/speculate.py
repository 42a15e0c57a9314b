"""Prompt-lookup speculation: guess the next tokens from where the context repeated itself.

When the last few tokens (an n-gram) occurred earlier in the prompt or the
output, the tokens that followed them then are proposed as a draft. The
worker decodes the draft together with the last sampled token and checks
it by sampling each position with the request's own sampler: a draft token
counts only if the sampler picks exactly it, so the output is what it would
have been without speculation (greedy or sampled, seeded or not), only
reached in fewer decode steps when the model copies: code edits, quoting,
rewriting a passage with one change, JSON that repeats its keys.

On a CPU a step costs about as much more as it decodes more tokens (two
tokens cost twice one, nine about four and a half times), so a draft pays
only when most of it is kept: drafts are never shorter than four tokens, a
request whose drafts keep missing stops drafting for a while (longer each
time), and while other sequences decode in the same steps (where a draft's
tokens cost the whole batch) only a request whose drafts have mostly been
kept drafts at all (the worker also caps the drafts of a step that decodes
a long prompt at 16 tokens, leaves them out of a step beside a short prompt,
and out of steps that carry more than four generating sequences).
"""

from __future__ import annotations

N = 3  # tokens of the n-gram looked up
MIN_DRAFT = 4
FIRST_DRAFT = 32
MAX_DRAFT = 64
MAX_DRAFTING = 4  # generating sequences beyond which a step carries no drafts
MAX_COOLDOWN = 64  # tokens without drafting after misses in a row, at most
CONFIDENT = 0.7  # share of drafted tokens kept, to draft while other sequences decode


class Drafter:
    """One request's drafts: an index of its context's n-grams, and how well drafts did."""

    def __init__(self) -> None:
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest copy ended
        self.indexed = 0  # n-grams ending before this position are in the index
        self.size = FIRST_DRAFT
        self.cooldown = 0  # tokens to go before the next draft
        self.misses = 0  # drafts missed in a row
        self.proposed = 0
        self.accepted = 0

    def propose(self, context: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier copy of the context's end."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return []
        if limit < MIN_DRAFT or len(context) <= N:
            return []
        # index every n-gram whose next token is known, i.e. all but the last one
        for end in range(max(self.indexed, N), len(context)):
            self.after[tuple(context[end - N : end])] = end
        self.indexed = len(context)
        start = self.after.get(tuple(context[-N:]))
        if start is None:
            return []
        return context[start : start + min(self.size, limit)]

    @property
    def reliable(self) -> bool:
        """Most of what it drafted was kept (or it has not drafted yet)."""
        return self.accepted >= CONFIDENT * self.proposed

    def record(self, drafted: int, accepted: int) -> None:
        """How a draft did: longer after a full match; a miss (under half kept) pauses drafting."""
        if drafted == 0:
            return
        self.proposed += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.size = min(MAX_DRAFT, self.size * 2)
            self.misses = 0
        elif 2 * accepted >= drafted:
            self.misses = 0
        else:
            self.size = max(MIN_DRAFT, self.size // 2)
            self.misses += 1
            self.cooldown = min(MAX_COOLDOWN, 2**self.misses)
