"""Chat completion requests: JSON body to a checked dataclass, or a 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vergeai.api.fields import (
    IGNORED_FIELDS,
    REFUSED_SAMPLERS,
    SAMPLING_FIELDS,
    FieldSpec,
    Sampled,
    bad,
    field_specs,
    integer,
    sampled,
    shown,
)
from vergeai.api.tools import LEGACY_ID, ToolUse, parse_tools, tool_calls_of
from vergeai.errors import InvalidRequest, Unsupported
from vergeai.state.history import SESSION_ID_RE

ROLES = ("system", "user", "assistant", "developer", "tool", "function")
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
MAX_TOP_LOGPROBS = 20
MEDIA_PARTS = ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file")

CHAT_FIELDS: tuple[FieldSpec, ...] = (
    *field_specs(
        "honoured",
        f"messages {SAMPLING_FIELDS} max_completion_tokens chat_template_kwargs "
        "reasoning_format session_id response_format json_schema logprobs top_logprobs tools "
        "tool_choice parallel_tool_calls functions function_call",
    ),
    # accepted for compatibility; they change nothing here
    *field_specs(
        "ignored",
        f"{IGNORED_FIELDS} store metadata service_tier prompt_cache_key safety_identifier "
        "reasoning_effort verbosity",
    ),
    # not supported (yet): a 400 naming the field, unless it asks for nothing
    FieldSpec("audio", "refused", (None,)),
    FieldSpec("modalities", "refused", (None, ["text"])),
    FieldSpec("prediction", "refused", (None,)),
    FieldSpec("web_search_options", "refused", (None,)),
    *REFUSED_SAMPLERS,
)
FIELDS_BY_NAME = {f.name: f for f in CHAT_FIELDS}


@dataclass(kw_only=True)
class ChatRequest(Sampled):
    messages: list[dict[str, Any]]
    enable_thinking: bool | None = None
    raw_reasoning: bool = False  # reasoning_format "none": tags stay in content
    session_id: str | None = None
    tools: ToolUse | None = None
    continue_final: bool = False  # the final assistant message is a prefill to continue


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """None without logprobs; else how many alternatives each token lists (0-20)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad("logprobs", "must be a boolean")
    top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad("top_logprobs", "needs 'logprobs': true")
    return (top or 0) if wanted else None


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
                raise bad(f"{where}[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise bad(where, "must be a string or a list of text parts")


def _messages(value: Any) -> list[dict[str, Any]]:
    """The messages as the chat template takes them; legacy function messages as tool ones."""
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty array of messages")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, for the results
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise bad(
                f"{where}.role",
                f"must be one of system, user, assistant, tool (got {shown(role)})",
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
                raise bad(f"{where}.tool_call_id", "must name the call this result answers")
            entry["tool_call_id"] = call_id
            name = message.get("name", names.get(call_id))
            if isinstance(name, str):
                entry["name"] = name
        out.append(entry)
    return out


def _enable_thinking(value: Any) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("chat_template_kwargs", "must be an object")
    flag = value.get("enable_thinking")
    if flag is not None and not isinstance(flag, bool):
        raise bad("chat_template_kwargs.enable_thinking", "must be true or false")
    return flag


def _reasoning_format(value: Any) -> bool:
    if value is None:
        return False
    if value not in REASONING_FORMATS:
        raise bad("reasoning_format", f"must be one of {', '.join(REASONING_FORMATS)}")
    return bool(value == "none")


def _session_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SESSION_ID_RE.match(value):
        raise bad("session_id", "must be 1-128 characters: letters, digits and . _ : @ -")
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    common = sampled(body, FIELDS_BY_NAME)
    tools = parse_tools(body)
    if tools is not None and common["grammar"] is not None and common["schema"] is None:
        raise bad("tools", "cannot be combined with a grammar")
    return ChatRequest(
        **common,
        messages=_messages(body.get("messages")),
        enable_thinking=_enable_thinking(body.get("chat_template_kwargs")),
        raw_reasoning=_reasoning_format(body.get("reasoning_format")),
        session_id=_session_id(body.get("session_id")),
        top_logprobs=_top_logprobs(body),
        tools=tools,
    )
