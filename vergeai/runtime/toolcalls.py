"""Tool calls out of generated text, as it streams: the markup never reaches content.

A :class:`Syntax` says how a model family writes its calls (Hermes/Qwen
``<tool_call>{...}</tool_call>``, Mistral ``[TOOL_CALLS][{...}, ...]``,
Llama 3.x's bare ``{"name": ..., "parameters": ...}`` at the start of the
answer). :class:`ToolCallParser` is fed the answer's text piece by piece and
returns the content around the calls and :class:`CallDelta` pieces of the
calls: the first names the call (id and function name), the next ones carry
its arguments as they are generated. A call written in another key order
is returned whole once its object closes. Text that could still be the
start of a marker is held back until the next piece decides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vergeai.runtime.reasoning import partial_tag

# {"name": "NAME", "arguments": — the head of a call written name first
HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
)


@dataclass(frozen=True)
class Syntax:
    opener: str  # text that starts the calls
    closer: str = ""  # text after each call (Hermes), if any
    array: bool = False  # the calls are one JSON array after the opener (Mistral)
    at_start: bool = False  # the opener counts only at the start of the answer (Llama 3)
    opener_in_json: bool = False  # the opener is the start of the call's JSON (spaces aside)


@dataclass
class CallDelta:
    index: int
    arguments: str
    id: str | None = None  # the call's first delta names it
    name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class _Scan:
    """Where a JSON object or array ends, fed in pieces: tracks depth and strings only."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, text: str) -> int:
        """Index just past the value's end in text, or -1 if it goes on."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


TEXT, BETWEEN, OBJECT, AFTER = "text", "between", "object", "after"


@dataclass
class ToolCallParser:
    syntax: Syntax
    new_id: Callable[[], str]
    parallel: bool = True
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = TEXT
        self.held = ""  # text not yet decided
        self.said = False  # content other than whitespace was emitted
        self.after_call = False  # no content yet since the last call
        self.obj = ""  # the current call's JSON so far
        self.obj_scan = _Scan()
        self.args_scan: _Scan | None = None  # the arguments are streamed
        self.args_sent = 0  # how much of obj went out as arguments
        self.args_done = False

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.held += text
        content: list[str] = []
        deltas: list[CallDelta] = []
        while self.held:
            before = (self.state, self.held)
            if self.state == TEXT:
                self._text(content)
            elif self.state == BETWEEN:
                self._between()
            elif self.state == OBJECT:
                self._object(content, deltas)
            else:
                self._after()
            if (self.state, self.held) == before:
                break  # waiting for more text
        return "".join(content), deltas

    def flush(self) -> tuple[str, list[CallDelta]]:
        """The end of the answer: held text is content; a call cut short keeps what it has."""
        content, deltas = "", []
        if self.state == OBJECT:
            if self.args_scan is not None:
                deltas = self._stream_args()
            # else a call cut off before its name: nothing a client could run
        elif self.state == TEXT and partial_tag(self.held, self.syntax.opener) != len(self.held):
            content = self._content(self.held)  # (not an opener cut short)
        elif self.state != TEXT and not self.syntax.closer.startswith(self.held.strip()):
            content = self._content(self.held)  # (not the closer cut short)
        self.held = ""
        return content, deltas

    # states

    def _text(self, content: list[str]) -> None:
        text, opener = self.held, self.syntax.opener
        if self.syntax.at_start:
            if self.said or self.calls:
                content.append(self._content(text))
                self.held = ""
                return
            head = text.lstrip()
            squeezed = re.sub(r"\s+", "", head)
            if opener.startswith(squeezed) and squeezed != opener:
                return  # could still become the opener
            if not squeezed.startswith(opener):
                content.append(self._content(text))
                self.held = ""
                return
            self.held = head
            self._open_call()
            return
        at = text.find(opener)
        if at < 0 or (self.calls and not self.parallel):
            keep = 0 if at >= 0 else partial_tag(text, opener)
            content.append(self._content(text[: len(text) - keep]))
            self.held = text[len(text) - keep :]
            return
        content.append(self._content(text[:at]))
        self.held = text[at + len(opener) :]
        if self.syntax.array:
            self.state = BETWEEN
        else:
            self._open_call()

    def _between(self) -> None:
        """Inside the Mistral array: before a call, between calls or at its end."""
        text = self.held.lstrip()
        if not text or text[0] == "{":
            self.held = text
            if text:
                self._open_call()
        elif text[0] in "[,":
            self.held = text[1:]
        else:
            self.held = text[1:] if text[0] == "]" else text
            self.state = TEXT

    def _object(self, content: list[str], deltas: list[CallDelta]) -> None:
        text, self.held = self.held, ""
        if not self.obj:
            text = text.lstrip()
            if not text:
                return
            if text[0] != "{":  # not a call after all
                content.append(self._content(self._opener_text()))
                self.held = text
                self.state = TEXT
                return
        end = self.obj_scan.feed(text)
        if end >= 0:
            text, self.held = text[:end], text[end:]
        self.obj += text
        if self.args_scan is None and not self._announce(deltas):
            if end >= 0:
                self._whole_call(content, deltas)
            return
        deltas.extend(self._stream_args())
        if end >= 0:
            self._close_call()

    def _after(self) -> None:
        """After a call: its closer (if the syntax has one), then what comes next."""
        closer = self.syntax.closer
        text = self.held.lstrip()
        if closer and closer.startswith(text) and text != closer:
            return
        self.held = text[len(closer) :] if closer and text.startswith(closer) else text
        self.state = BETWEEN if self.syntax.array else TEXT

    # calls

    def _open_call(self) -> None:
        self.state = OBJECT
        self.obj = ""
        self.obj_scan = _Scan()
        self.args_scan = None
        self.args_done = False

    def _announce(self, deltas: list[CallDelta]) -> bool:
        """Once the name and the start of an arguments object are in: name the call."""
        match = HEAD.match(self.obj)
        if match is None or self.obj[match.end()] != "{":
            return False
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:  # a bad escape in a name the grammar did not hold
            name = match.group(1)
        call = ToolCall(self.new_id(), name)
        self.calls.append(call)
        deltas.append(CallDelta(len(self.calls) - 1, "", call.id, name))
        self.args_scan = _Scan()
        self.args_sent = match.end()
        return True

    def _stream_args(self) -> list[CallDelta]:
        assert self.args_scan is not None
        if self.args_done:
            return []
        fresh = self.obj[self.args_sent :]
        end = self.args_scan.feed(fresh)
        if end >= 0:
            fresh = fresh[:end]
            self.args_done = True
        self.args_sent += len(fresh)
        if not fresh:
            return []
        self.calls[-1].arguments += fresh
        return [CallDelta(len(self.calls) - 1, fresh)]

    def _whole_call(self, content: list[str], deltas: list[CallDelta]) -> None:
        """A call in another shape: parse it whole, or give it back as text if it is none."""
        try:
            value = json.loads(self.obj)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict) and isinstance(value.get("function"), dict):
            value = value["function"]  # {"type": "function", "function": {...}}
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(value, dict) or not isinstance(name, str):
            content.append(self._content(self._opener_text() + self.obj))
            self.state = TEXT
            return
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = ToolCall(self.new_id(), name, arguments)
        self.calls.append(call)
        deltas.append(CallDelta(len(self.calls) - 1, arguments, call.id, name))
        self._close_call()

    def _close_call(self) -> None:
        self.state = AFTER
        self.after_call = True
        self.args_scan = None

    def _opener_text(self) -> str:
        return "" if self.syntax.opener_in_json else self.syntax.opener

    def _content(self, text: str) -> str:
        """Text for the answer; the whitespace after a call is not part of it."""
        if self.after_call:
            text = text.lstrip()
            if not text:
                return ""
            self.after_call = False
        if text and not text.isspace():
            self.said = True
        return text
