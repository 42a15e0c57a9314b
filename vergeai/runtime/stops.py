"""Stop strings over streamed text, without rescanning what was already sent."""

from __future__ import annotations


class StopMatcher:
    """Feeds text pieces; returns what is safe to emit now.

    Text that could be the start of a stop string is held back until the
    next piece decides it. Only the held tail plus the new piece is searched.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        text = self.held + piece
        first = min(((i, s) for s in self.stops if (i := text.find(s)) >= 0), default=None)
        if first is not None:
            self.held = ""
            self.stopped = True
            self.matched = first[1]
            return text[: first[0]]
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
