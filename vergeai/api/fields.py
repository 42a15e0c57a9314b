"""What every generating endpoint's request shares: field tables, checks, sampling fields.

Each endpoint has a table of the fields it knows (honoured, ignored, or
refused unless neutral); the README lists them and a test keeps the two in
step. The checks raise a 400 naming the field.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vergeai.api.structured import check_schema, response_format_schema
from vergeai.errors import InvalidRequest, Unsupported
from vergeai.runtime.constraint import GrammarSpec

MAX_STOPS = 16
MAX_STOP_LENGTH = 1024
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR = 64 * 1024
MAX_GRAMMAR_DEPTH = 256
MAX_TOKENS = 1_000_000
DEFAULT_REPEAT_LAST_N = 64  # llama-server's
MAX_CHOICES = 8
MAX_SALT = 256

log = logging.getLogger("vergeai.api")

# every generating endpoint's sampling fields (llama-server's names too)
SAMPLING_FIELDS = (
    "model stream stream_options max_tokens n_predict temperature top_p top_k min_p stop seed "
    "presence_penalty frequency_penalty repeat_penalty repeat_last_n logit_bias grammar n "
    "cache_salt keep_alive"
)
# accepted for compatibility; they change nothing here
IGNORED_FIELDS = (
    "user cache_prompt n_keep id_slot samplers mirostat_tau mirostat_eta dynatemp_exponent "
    "xtc_threshold dry_base dry_allowed_length dry_penalty_last_n dry_sequence_breakers"
)


@dataclass(frozen=True)
class FieldSpec:
    """One request field and what the server does with it (the README lists them all)."""

    name: str
    kind: Literal["honoured", "ignored", "refused"]
    neutral: tuple[Any, ...] = ()  # refused fields: values that ask for nothing, accepted


def field_specs(kind: Literal["honoured", "ignored"], names: str) -> list[FieldSpec]:
    return [FieldSpec(name, kind) for name in names.split()]


# llama-server's samplers that are not here: a 400 unless the value asks for nothing
REFUSED_SAMPLERS = (
    FieldSpec("mirostat", "refused", (None, 0)),
    FieldSpec("typical_p", "refused", (None, 1)),
    FieldSpec("tfs_z", "refused", (None, 1)),
    FieldSpec("dynatemp_range", "refused", (None, 0)),
    FieldSpec("xtc_probability", "refused", (None, 0)),
    FieldSpec("dry_multiplier", "refused", (None, 0)),
    FieldSpec("top_n_sigma", "refused", (None, -1)),
    FieldSpec("ignore_eos", "refused", (None, False)),
    FieldSpec("n_probs", "refused", (None, 0)),
)


@dataclass(kw_only=True)
class Sampled:
    """The fields of a request that generates: the model, the stream, the sampling."""

    model: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N  # -1: the whole context
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF
    schema: dict[str, Any] | None = None  # response_format's (or json_schema's)
    schema_param: str = "response_format"  # the field that gave the schema
    top_logprobs: int | None = None  # None: no logprobs
    n: int = 1  # choices
    cache_salt: str | None = None  # vLLM's: cached prefixes are shared only under the same salt
    keep_alive: float | None = None  # Ollama's: seconds the model stays loaded idle; <0 ever


def sampled(body: dict[str, Any], table: dict[str, FieldSpec]) -> dict[str, Any]:
    """The :class:`Sampled` fields of a request body, checked (logprobs are the endpoint's).

    Fields the endpoint's table refuses are refused first, after the model.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "must name an assistant")
    check_fields(body, table)
    stream, include_usage = _streaming(body)
    grammar, schema, param = _constraint_fields(body)
    return dict(
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=_max_tokens(body),
        temperature=number(body, "temperature", 0.0, 2.0),
        top_p=number(body, "top_p", 0.0, 1.0),
        stop=stop_field(body.get("stop")),
        seed=integer(body, "seed", -(2**63), 2**64 - 1),
        top_k=integer(body, "top_k", 0, 1_000_000),
        min_p=number(body, "min_p", 0.0, 1.0),
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repeat_penalty=number(body, "repeat_penalty", 0.0, 10.0, low_open=True) or 1.0,
        repeat_last_n=_repeat_last_n(body),
        logit_bias=logit_bias_field(body.get("logit_bias")),
        grammar=grammar,
        schema=schema,
        schema_param=param,
        n=integer(body, "n", 1, MAX_CHOICES) or 1,
        cache_salt=cache_salt_field(body.get("cache_salt")),
        keep_alive=keep_alive_field(body.get("keep_alive")),
    )


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """stream, and stream_options.include_usage."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "must be an object")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", "must be a boolean")
    return stream, include_usage


def _constraint_fields(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, str]:
    """The grammar, or the JSON schema and the field that gave it (one of them at most)."""
    grammar = grammar_field(body.get("grammar"))
    schema = response_format_schema(body.get("response_format"))
    param = "response_format"
    if body.get("json_schema") is not None:
        if schema is not None:
            raise bad("json_schema", "give response_format or json_schema, not both")
        schema, param = body["json_schema"], "json_schema"
        if not isinstance(schema, dict):
            raise bad("json_schema", "must be a JSON schema object")
    if schema is not None:
        if grammar is not None:
            raise bad(param, f"give grammar or {param}, not both")
        check_schema(schema, param)
    return grammar, schema, param


def _max_tokens(body: dict[str, Any]) -> int | None:
    # the first one given wins; n_predict is llama-server's name, where -1 means no limit
    n_predict = integer(body, "n_predict", -1, MAX_TOKENS)
    limits = (
        integer(body, "max_completion_tokens", 1, MAX_TOKENS),
        integer(body, "max_tokens", 1, MAX_TOKENS),
        None if n_predict in (-1, 0) else n_predict,
    )
    return next((n for n in limits if n is not None), None)


def grammar_spec(req: Sampled) -> GrammarSpec | None:
    """What the request's own output must follow: its schema, else its grammar."""
    if req.schema is not None:
        return GrammarSpec.schema(req.schema, req.schema_param)
    if req.grammar is not None:
        return GrammarSpec("gbnf", req.grammar, "grammar")
    return None


def bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {message}", param=param)


def shown(value: Any, limit: int = 40) -> str:
    """A client's value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def number(
    body: dict[str, Any], name: str, lo: float, hi: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, "must be a number")
    if isinstance(value, int) and not -(2**63) <= value <= 2**63:  # float() could overflow
        raise bad(name, f"must be between {lo:g} and {hi:g}")
    value = float(value)
    if not math.isfinite(value):
        raise bad(name, "must be a number")
    if not lo <= value <= hi or (low_open and value == lo):
        span = f"above {lo:g} and at most {hi:g}" if low_open else f"between {lo:g} and {hi:g}"
        raise bad(name, f"must be {span}")
    return value


def integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, "must be an integer")
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo} and {hi}")
    return value


def _repeat_last_n(body: dict[str, Any]) -> int:
    value = integer(body, "repeat_last_n", -1, 1_000_000)
    return DEFAULT_REPEAT_LAST_N if value is None else value


def stop_field(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "must be a string or an array of strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop sequences")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise bad("stop", f"each stop sequence is at most {MAX_STOP_LENGTH} characters")
    return [s for s in stops if s]


def logit_bias_field(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", "must be an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"key {shown(key)} is not a token id") from None
        if token < 0:
            raise bad("logit_bias", f"key {shown(key)} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad("logit_bias", f"bias for {shown(key)} must be a number from -100 to 100")
        out[token] = float(bias)
    return out


def cache_salt_field(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SALT:
        raise bad("cache_salt", f"must be a string of 1-{MAX_SALT} characters")
    return value


DURATION_RE = re.compile(r"(-?\d{1,9}(?:\.\d{1,6})?)(ms|s|m|h)?")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_KEEP_ALIVE = 366 * 86_400.0


def keep_alive_field(value: Any) -> float | None:
    """Ollama's keep_alive: seconds, or a duration ("90s", "5m", "1h"); negative: kept
    loaded until a request says otherwise; 0: unloaded once idle."""
    if value is None:
        return None
    if isinstance(value, str) and (match := DURATION_RE.fullmatch(value.strip())):
        seconds = float(match[1]) * DURATION_UNITS[match[2]]
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    else:
        raise bad("keep_alive", 'must be seconds or a duration such as "5m" or "1h"')
    if seconds > MAX_KEEP_ALIVE:
        raise bad("keep_alive", "must be at most a year; a negative value keeps the model loaded")
    return -1.0 if seconds < 0 else seconds


def grammar_field(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad("grammar", "must be a GBNF grammar string")
    if len(value) > MAX_GRAMMAR:
        raise bad("grammar", f"at most {MAX_GRAMMAR} characters")
    if _group_depth(value) > MAX_GRAMMAR_DEPTH:
        raise bad("grammar", f"groups nest deeper than {MAX_GRAMMAR_DEPTH} levels")
    return value


def _group_depth(grammar: str) -> int:
    """How deep ( ) groups nest, outside literals, classes and comments.

    llama.cpp's grammar parser recurses once per level: some 20,000 levels
    overflow its stack and kill the process, so we refuse deep ones first.
    """
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        ch = grammar[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif ch == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return deepest


def _same(a: Any, b: Any) -> bool:
    """Equal, with true/false never equal to 1/0."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(type(a) in (bool, int, float, str, type(None)) and a == b)


def check_fields(body: dict[str, Any], table: dict[str, FieldSpec]) -> None:
    """Refuse what asks for a feature we do not have; log fields we do not know."""
    unknown = []
    for name, value in body.items():
        spec = table.get(name)
        if spec is None:
            unknown.append(name)
        elif spec.kind == "refused" and not any(_same(value, n) for n in spec.neutral):
            raise Unsupported(f"'{name}' is not supported (yet) by this server", param=name)
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in sorted(unknown)[:8])
        log.info("ignoring unknown request fields: %s", shown)
