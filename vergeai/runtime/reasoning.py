"""Split <think>…</think> reasoning from the answer, also when tags arrive in pieces."""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """True when the rendered prompt leaves a think block open for the model to fill."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


def close_open_think(prompt: str) -> str:
    """Disable thinking for a template that opens the block itself: close it empty."""
    if not prompt_opens_think(prompt):
        return prompt
    return prompt.rstrip() + "\n\n" + CLOSE + "\n\n"


class ReasoningSplitter:
    """Feed generated text; get (reasoning, content) pieces safe to emit.

    A tail that could be the start of a tag is held back until the next
    piece decides it, so a tag split across tokens never leaks into content.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self.held = ""
        self.after_close = False  # the newlines after </think> are not part of the answer

    def feed(self, text: str) -> tuple[str, str]:
        text = self.held + text
        self.held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            tag = CLOSE if self.in_reasoning else OPEN
            out = reasoning if self.in_reasoning else content
            at = text.find(tag)
            if at >= 0:
                out.append(text[:at])
                text = text[at + len(tag) :]
                self.in_reasoning = not self.in_reasoning
                self.after_close = not self.in_reasoning
                continue
            keep = _partial_tag(text, tag)
            out.append(text[: len(text) - keep])
            self.held = text[len(text) - keep :]
            break
        return "".join(reasoning), self._answer("".join(content))

    def _answer(self, content: str) -> str:
        if self.after_close:
            content = content.lstrip("\n")
            self.after_close = not content
        return content

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", self._answer(held))


def _partial_tag(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
