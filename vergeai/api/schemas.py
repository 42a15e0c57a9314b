"""Chat completion requests: JSON body to a checked dataclass, or a 400 naming the field."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vergeai.api.structured import response_format_schema, schema_grammar
from vergeai.api.tools import LEGACY_ID, ToolUse, parse_tools, tool_calls_of
from vergeai.errors import InvalidRequest, Unsupported
from vergeai.state.history import SESSION_ID_RE

ROLES = ("system", "user", "assistant", "developer", "tool", "function")
MAX_STOPS = 16
MAX_STOP_LENGTH = 1024
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR = 64 * 1024
MAX_GRAMMAR_DEPTH = 256
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
MAX_TOKENS = 1_000_000
DEFAULT_REPEAT_LAST_N = 64  # llama-server's
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8
MEDIA_PARTS = ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file")

log = logging.getLogger("vergeai.chat")


@dataclass(frozen=True)
class FieldSpec:
    """One request field and what the server does with it (the README lists them all)."""

    name: str
    kind: Literal["honoured", "ignored", "refused"]
    neutral: tuple[Any, ...] = ()  # refused fields: values that ask for nothing, accepted


def _fields(kind: Literal["honoured", "ignored"], names: str) -> list[FieldSpec]:
    return [FieldSpec(name, kind) for name in names.split()]


CHAT_FIELDS: tuple[FieldSpec, ...] = (
    *_fields(
        "honoured",
        "model messages stream stream_options max_tokens max_completion_tokens n_predict "
        "temperature top_p top_k min_p stop seed presence_penalty frequency_penalty "
        "repeat_penalty repeat_last_n logit_bias chat_template_kwargs reasoning_format "
        "session_id grammar response_format json_schema logprobs top_logprobs n tools "
        "tool_choice parallel_tool_calls functions function_call",
    ),
    # accepted for compatibility; they change nothing here
    *_fields(
        "ignored",
        "user store metadata service_tier prompt_cache_key "
        "safety_identifier reasoning_effort verbosity cache_prompt n_keep id_slot samplers "
        "mirostat_tau mirostat_eta dynatemp_exponent xtc_threshold dry_base "
        "dry_allowed_length dry_penalty_last_n dry_sequence_breakers",
    ),
    # not supported (yet): a 400 naming the field, unless it asks for nothing
    FieldSpec("audio", "refused", (None,)),
    FieldSpec("modalities", "refused", (None, ["text"])),
    FieldSpec("prediction", "refused", (None,)),
    FieldSpec("web_search_options", "refused", (None,)),
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


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
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
    enable_thinking: bool | None = None
    raw_reasoning: bool = False  # reasoning_format "none": tags stay in content
    session_id: str | None = None
    grammar: str | None = None
    schema: dict[str, Any] | None = None  # response_format's (or json_schema's); then grammar's
    top_logprobs: int | None = None  # None: no logprobs
    n: int = 1  # choices
    tools: ToolUse | None = None


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {message}", param=param)


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(
    body: dict[str, Any], name: str, lo: float, hi: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "must be a number")
    if isinstance(value, int) and not -(2**63) <= value <= 2**63:  # float() could overflow
        raise _bad(name, f"must be between {lo:g} and {hi:g}")
    value = float(value)
    if not math.isfinite(value):
        raise _bad(name, "must be a number")
    if not lo <= value <= hi or (low_open and value == lo):
        span = f"above {lo:g} and at most {hi:g}" if low_open else f"between {lo:g} and {hi:g}"
        raise _bad(name, f"must be {span}")
    return value


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """None without logprobs; else how many alternatives each token lists (0-20)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad("logprobs", "must be a boolean")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise _bad("top_logprobs", "needs 'logprobs': true")
    return (top or 0) if wanted else None


def _repeat_last_n(body: dict[str, Any]) -> int:
    value = _integer(body, "repeat_last_n", -1, 1_000_000)
    return DEFAULT_REPEAT_LAST_N if value is None else value


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS:
                raise Unsupported(
                    f"'{where}[{j}]': the models here take text only; {kind} content parts "
                    "need a multimodal model, which this server cannot load yet",
                    param=where,
                )
            if kind != "text":
                raise Unsupported(
                    f"'{where}[{j}]': only text content parts are supported", param=where
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise _bad(where, "must be a string or a list of text parts")


def _messages(value: Any) -> list[dict[str, Any]]:
    """The messages as the chat template takes them; legacy function messages as tool ones."""
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty array of messages")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, for the results
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role",
                f"must be one of system, user, assistant, tool (got {_shown(role)})",
            )
        content = message.get("content")
        calls = tool_calls_of(message, where) if role == "assistant" else None
        if content is None and (role == "assistant" or calls):
            content = ""
        entry: dict[str, Any] = {
            "role": {"developer": "system", "function": "tool"}.get(role, role),
            "content": _content(content, f"{where}.content"),
        }
        if calls:
            entry["tool_calls"] = calls
            names.update((c["id"], c["function"]["name"]) for c in calls)
        if role in ("tool", "function"):
            call_id = message.get("tool_call_id", LEGACY_ID if role == "function" else None)
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.tool_call_id", "must name the call this result answers")
            entry["tool_call_id"] = call_id
            name = message.get("name", names.get(call_id))
            if isinstance(name, str):
                entry["name"] = name
        out.append(entry)
    return out


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or an array of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop sequences")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise _bad("stop", f"each stop sequence is at most {MAX_STOP_LENGTH} characters")
    return [s for s in stops if s]


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {_shown(key)} is not a token id") from None
        if token < 0:
            raise _bad("logit_bias", f"key {_shown(key)} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"bias for {_shown(key)} must be a number from -100 to 100")
        out[token] = float(bias)
    return out


def _enable_thinking(value: Any) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("chat_template_kwargs", "must be an object")
    flag = value.get("enable_thinking")
    if flag is not None and not isinstance(flag, bool):
        raise _bad("chat_template_kwargs.enable_thinking", "must be true or false")
    return flag


def _reasoning_format(value: Any) -> bool:
    if value is None:
        return False
    if value not in REASONING_FORMATS:
        raise _bad("reasoning_format", f"must be one of {', '.join(REASONING_FORMATS)}")
    return bool(value == "none")


def _session_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SESSION_ID_RE.match(value):
        raise _bad("session_id", "must be 1-128 characters: letters, digits and . _ : @ -")
    return value


def _grammar(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad("grammar", "must be a GBNF grammar string")
    if len(value) > MAX_GRAMMAR:
        raise _bad("grammar", f"at most {MAX_GRAMMAR} characters")
    if _group_depth(value) > MAX_GRAMMAR_DEPTH:
        raise _bad("grammar", f"groups nest deeper than {MAX_GRAMMAR_DEPTH} levels")
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


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse what asks for a feature we do not have; log fields we do not know."""
    unknown = []
    for name, value in body.items():
        spec = FIELDS_BY_NAME.get(name)
        if spec is None:
            unknown.append(name)
        elif spec.kind == "refused" and not any(_same(value, n) for n in spec.neutral):
            raise Unsupported(f"'{name}' is not supported (yet) by this server", param=name)
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in sorted(unknown)[:8])
        log.info("ignoring unknown request fields: %s", shown)


FIELDS_BY_NAME = {f.name: f for f in CHAT_FIELDS}


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must name an assistant")
    _check_fields(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", "must be a boolean")
    grammar = _grammar(body.get("grammar"))
    schema = response_format_schema(body.get("response_format"))
    param = "response_format"
    if body.get("json_schema") is not None:
        if schema is not None:
            raise _bad("json_schema", "give response_format or json_schema, not both")
        schema, param = body["json_schema"], "json_schema"
        if not isinstance(schema, dict):
            raise _bad("json_schema", "must be a JSON schema object")
    if schema is not None:
        if grammar is not None:
            raise _bad(param, f"give grammar or {param}, not both")
        grammar = schema_grammar(schema, param)
    tools = parse_tools(body)
    if tools is not None and grammar is not None and schema is None:
        raise _bad("tools", "cannot be combined with a grammar")
    # the first one given wins; n_predict is llama-server's name, where -1 means no limit
    n_predict = _integer(body, "n_predict", -1, MAX_TOKENS)
    limits = (
        _integer(body, "max_completion_tokens", 1, MAX_TOKENS),
        _integer(body, "max_tokens", 1, MAX_TOKENS),
        None if n_predict in (-1, 0) else n_predict,
    )
    max_tokens = next((n for n in limits if n is not None), None)
    return ChatRequest(
        model=model,
        messages=_messages(body.get("messages")),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        top_k=_integer(body, "top_k", 0, 1_000_000),
        min_p=_number(body, "min_p", 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, low_open=True) or 1.0,
        repeat_last_n=_repeat_last_n(body),
        logit_bias=_logit_bias(body.get("logit_bias")),
        enable_thinking=_enable_thinking(body.get("chat_template_kwargs")),
        raw_reasoning=_reasoning_format(body.get("reasoning_format")),
        session_id=_session_id(body.get("session_id")),
        grammar=grammar,
        schema=schema,
        top_logprobs=_top_logprobs(body),
        n=_integer(body, "n", 1, MAX_CHOICES) or 1,
        tools=tools,
    )
