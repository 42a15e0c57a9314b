"""Split <think>…</think> reasoning from the answer, also when tags arrive in pieces.

As in llama.cpp's server, reasoning is recognised only where it can be: at
the very start of the output (or from the start, when the prompt already
opened the block). A `<think>` later in an answer is just text.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """True when the rendered prompt leaves a think block open for the model to fill."""
    return prompt.rstrip().endswith(OPEN)


def close_open_think(prompt: str) -> str:
    """Disable thinking for a template that opens the block itself: close it empty."""
    if not prompt_opens_think(prompt):
        return prompt
    return prompt.rstrip() + "\n\n" + CLOSE + "\n\n"


class ReasoningSplitter:
    """Feed generated text; get (reasoning, content) pieces safe to emit.

    Text that could still turn out to be a tag is held back until the next
    piece decides it, so a tag split across tokens never leaks into content.
    """

    START, REASONING, CONTENT = "start", "reasoning", "content"

    def __init__(self, prompt_opened: bool = False) -> None:
        self.state = self.REASONING if prompt_opened else self.START
        self.held = ""
        self.after_close = False  # the newlines after </think> are not part of the answer

    @property
    def in_reasoning(self) -> bool:
        return self.state == self.REASONING

    def feed(self, text: str) -> tuple[str, str]:
        text = self.held + text
        self.held = ""
        reasoning = ""
        if self.state == self.START:
            head = text.lstrip()
            if not head or (OPEN.startswith(head) and head != OPEN):
                self.held = text
                return "", ""
            if head.startswith(OPEN):
                self.state = self.REASONING
                text = head[len(OPEN) :]
            else:
                self.state = self.CONTENT
        if self.state == self.REASONING:
            at = text.find(CLOSE)
            if at < 0:
                keep = partial_tag(text, CLOSE)
                self.held = text[len(text) - keep :]
                return text[: len(text) - keep], ""
            reasoning, text = text[:at], text[at + len(CLOSE) :]
            self.state = self.CONTENT
            self.after_close = True
        return reasoning, self._answer(text)

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", self._answer(held))

    def _answer(self, content: str) -> str:
        if self.after_close:
            content = content.lstrip("\n")
            self.after_close = not content
        return content


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that begins tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
