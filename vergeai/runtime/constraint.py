"""Constrained generation: grammars and JSON schemas held by llguidance, bounded for any caller.

llama.cpp's own grammar sampler was not written for hostile input: a grammar
no token can satisfy aborts the process, deep or huge ones overflow its
stack, ambiguous ones double its work per token. llguidance (the engine
llama.cpp itself can build in) compiles GBNF, Lark and JSON Schema under
:data:`LIMITS`, which bound the grammar's size, the lexer's states and the
work of every token's mask; a grammar past them is refused when compiled,
and a step past them ends its request alone, with the reason.

A request's grammar is a :class:`GrammarSpec` (what it asked, no model
needed), compiled off the event loop into a :class:`Grammar` against the
model's vocabulary; each sequence then gets its own :class:`Constraint`,
which lives on the worker thread alone: it masks the logits at each output
before the sampler chain runs, and consumes the token picked. A lazy grammar
(tool calls under ``tool_choice: auto``) masks nothing until one of its
trigger patterns matches the text generated so far.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np
import numpy.typing as npt
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from vergeai.errors import InvalidRequest

# Each bound is llguidance's own unit; the comments give what it costs at most.
LIMITS = llguidance.LLParserLimits(
    max_items_in_row=2_000,  # alternatives in one rule (ambiguity)
    initial_lexer_fuel=1_000_000,  # building the lexer: ~20 ms
    step_lexer_fuel=200_000,  # one token's mask, lexer part: ~15 ms
    step_max_items=50_000,  # one token's mask, parser part: ~2.5 ms
    max_lexer_states=50_000,  # lexer memory: ~100 MB
    max_grammar_size=200_000,  # symbols in all productions
    verbose_errors=False,  # errors go to the caller: no parser dumps
)
# JSON's whitespace as llama-cpp-python's converter allowed it: one space at most
# between tokens (more lets a small model wander in whitespace, or in nested keys)
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": " ?"}
TRIGGER_WINDOW = 256  # characters of recent output a lazy grammar's trigger is matched in

Kind = Literal["gbnf", "json_schema", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to follow; compiled once the model is known.

    ``markers`` are literal strings the ``lark`` text names as ``marker_i``
    rules: a marker the vocabulary has as one special token (Qwen's
    ``<tool_call>``) may be that token or its spelling.
    """

    kind: Kind
    text: str  # GBNF, Lark, or the schema as JSON
    param: str  # the request field an error names
    triggers: tuple[str, ...] = ()  # lazy: applies from where one of these patterns matches
    markers: tuple[str, ...] = ()

    @classmethod
    def schema(cls, schema: dict[str, Any], param: str) -> GrammarSpec:
        """A request's own schema: a keyword llguidance cannot enforce is refused."""
        return cls("json_schema", json_schema_text(schema), param)


def json_schema_text(schema: dict[str, Any], lenient: bool = False) -> str:
    """A schema as llguidance reads it: our JSON options, and ``lenient`` to let
    keywords it cannot enforce pass instead of refusing the schema (tools)."""
    options = {**JSON_OPTIONS, "lenient": lenient}
    return json.dumps({**_tightened(schema), "x-guidance": options}, ensure_ascii=False)


MAX_INTEGER = 10**16 - 1  # llama.cpp's converter's bound too: 16 digits
# number keywords are held within this (a minimum and maximum both near -2^63 segfaulted
# llguidance 1.9.1; a bound past it is outside what a 16-digit integer can reach anyway)
MAX_BOUND = 10**18
NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _tightened(schema: Any, closed: bool = True) -> Any:
    """The schema as llama.cpp's converter reads it, where it leaves a choice open:
    an object with ``properties`` has no others unless ``additionalProperties``
    says so (``closed``; not each part of an ``allOf``, whose parts add up), and
    an integer without a bound has at most 16 digits. A small model otherwise
    often writes keys or digits until max_tokens. Number bounds are held within
    ±:data:`MAX_BOUND`."""
    if isinstance(schema, list):
        return [_tightened(item, closed) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DATA_KEYWORDS:
            out[key] = value
        elif key in NAMED and isinstance(value, dict):  # names to schemas, not a schema
            out[key] = {name: _tightened(child) for name, child in value.items()}
        else:
            out[key] = _tightened(value, key != "allOf")
    open_keys = {"additionalProperties", "patternProperties"}
    if closed and "properties" in schema and not open_keys & set(schema):
        out["additionalProperties"] = False
    for bound in NUMBER_BOUNDS:  # llguidance crashes on integer bounds near 64-bit limits
        value = schema.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[bound] = min(max(value, -MAX_BOUND), MAX_BOUND)
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = MAX_INTEGER
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -MAX_INTEGER
    return out


class Grammar:
    """A spec compiled against one vocabulary; starts any number of constraints."""

    def __init__(
        self, matcher: llguidance.LLMatcher, spec: GrammarSpec, tokenizer: llguidance.LLTokenizer
    ) -> None:
        self._matcher = matcher  # never advanced: each constraint starts from a copy
        self.param = spec.param
        self.triggers = tuple(re.compile(t) for t in spec.triggers)
        self.tokenizer = tokenizer

    def start(self) -> Constraint:
        """A fresh constraint for one sequence, used from then on by one thread only."""
        return Constraint(self._matcher.deep_copy(), self)


def compile_grammar(
    tokenizer: llguidance.LLTokenizer, spec: GrammarSpec, specials: dict[str, int]
) -> Grammar:
    """Compile a spec under :data:`LIMITS`; a 400 naming the field and the reason if it fails.

    ``specials``: the spec's markers that the vocabulary has as one special
    token, and its id. Compiling takes up to a few hundred milliseconds and
    releases the GIL: call it off the event loop.
    """
    try:
        source = grammar_source(spec, specials)
    except (ValueError, RecursionError, GbnfToLarkError) as exc:
        raise _refused(spec, str(exc) or type(exc).__name__) from None
    matcher = llguidance.LLMatcher(tokenizer, source, log_level=0, limits=LIMITS)
    if not matcher.is_error():
        # the first mask builds what compiling leaves for later (a huge repetition's
        # lexer states; an empty language's search for a first token): a grammar
        # that cannot be followed from its start is refused here, not in a slot
        matcher.compute_bitmask()
    if matcher.is_error():
        raise _refused(spec, matcher.get_error())
    return Grammar(matcher, spec, tokenizer)


def grammar_source(spec: GrammarSpec, specials: dict[str, int]) -> str:
    """The spec as llguidance's grammar text (GBNF converted; the markers' rules added)."""
    if spec.kind == "json_schema":
        return str(llguidance.LLMatcher.grammar_from_json_schema(spec.text))
    lark = any_to_lark(spec.text) if spec.kind == "gbnf" else spec.text
    for i, marker in enumerate(spec.markers):
        spelled = json.dumps(marker)
        either = f"{spelled} | <[{specials[marker]}]>" if marker in specials else spelled
        lark += f"\nmarker_{i}: {either}"
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def _refused(spec: GrammarSpec, reason: str) -> InvalidRequest:
    what = "grammar" if spec.param == "grammar" else "JSON schema"
    reason = _clean(reason)
    return InvalidRequest(
        f"'{spec.param}': this {what} cannot be enforced: {reason}", param=spec.param
    )


class NoTokenAllowed(Exception):
    """The grammar allows no token here (or ran past a limit); the request ends."""


class Constraint:
    """One sequence's place in its grammar; used by the worker thread only."""

    def __init__(self, matcher: llguidance.LLMatcher, grammar: Grammar) -> None:
        self._matcher = matcher
        self._grammar = grammar
        self.active = not grammar.triggers
        self._recent: list[tuple[int, str]] = []  # before a trigger: tokens and their text
        words = (grammar.tokenizer.vocab_size + 31) // 32
        self._bits: npt.NDArray[np.uint32] = np.zeros(words, dtype=np.uint32)

    def mask(self, logits: npt.NDArray[np.float32]) -> None:
        """Set every token the grammar does not allow next to -inf, in place."""
        if not self.active:
            return
        m = self._matcher
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if m.is_error():
            raise NoTokenAllowed(_reason(m.get_error()))
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        allowed = np.zeros(len(logits), dtype=bool)  # (the two vocabularies are one, as a rule)
        n = min(len(bits), len(logits))
        allowed[:n] = bits[:n]
        if not allowed.any():
            raise NoTokenAllowed("the grammar allows no token here")
        logits[~allowed] = -np.inf

    @property
    def param(self) -> str:
        """The request field its grammar came from, for an error."""
        return self._grammar.param

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more: the answer ends here."""
        return self.active and self._matcher.is_stopped()

    def accept(self, token: int, text: str) -> None:
        """The token picked (``text``: what it adds to the output)."""
        if self.active:
            if not self._matcher.consume_token(token):
                raise NoTokenAllowed(_reason(self._matcher.get_error()))
            return
        self._recent.append((token, text))
        joined = "".join(t for _, t in self._recent)
        if len(joined) > TRIGGER_WINDOW:
            while len(joined) - len(self._recent[0][1]) >= TRIGGER_WINDOW:
                joined = joined[len(self._recent.pop(0)[1]) :]
        for pattern in self._grammar.triggers:
            match = pattern.search(joined)
            if match is not None:
                self._begin(joined, match.start(match.lastindex or 0))
                return

    def _begin(self, joined: str, at: int) -> None:
        """A trigger matched: the grammar applies from ``at``, fed what came since."""
        self.active = True
        offset, tail = 0, None
        for i, (_, text) in enumerate(self._recent):
            if offset == at:  # the grammar starts at a token: feed those very tokens
                tail = [token for token, _ in self._recent[i:]]
                break
            offset += len(text)
        if tail is None:  # it starts inside a token: feed the rest as text
            tail = self._grammar.tokenizer.tokenize_str(joined[at:])
        self._recent = []
        if not self._matcher.consume_tokens(tail):
            raise NoTokenAllowed(_reason(self._matcher.get_error()))


def _reason(error: str) -> str:
    return f"the output cannot follow the grammar: {_clean(error) or 'no token fits'}"


def _clean(error: str) -> str:
    """llguidance's message on one line, without its marker for withheld details."""
    return " ".join(error.replace("<non-verbose/>", "").split())[:300]
