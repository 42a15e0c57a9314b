"""A chat request for a remote assistant: vergeai's front, then the upstream server's answer.

Everything before the model stays here, as for a local assistant: the
assistant's system prompt, chat history, thinking control, sampling
defaults, limits. What the upstream receives is an OpenAI chat request
built from the checked request, asked to stream and to report its usage.
"""

from __future__ import annotations

from typing import Any

from vergeai.api.conversation import Sessions, fit_remote
from vergeai.api.defaults import max_tokens_for
from vergeai.api.engines import Online
from vergeai.api.fields import DEFAULT_REPEAT_LAST_N
from vergeai.api.generation import Generation, Memory
from vergeai.api.outputs import Answer
from vergeai.api.policy import thinking_for
from vergeai.api.schemas import ChatRequest
from vergeai.api.tools import ToolUse
from vergeai.limits import Gate
from vergeai.runtime.prompt import Message
from vergeai.state.assistants import Assistant
from vergeai.upstream.stream import RemoteJob


def upstream_body(
    assistant: Assistant,
    req: ChatRequest,
    messages: list[Message],
    thinking: bool | None,
    max_tokens: int,
) -> dict[str, Any]:
    """The OpenAI chat request the upstream gets: only what differs from its defaults."""
    body: dict[str, Any] = {
        "model": assistant.upstream_model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }
    optional = {
        "temperature": req.temperature if req.temperature is not None else assistant.temperature,
        "top_p": req.top_p if req.top_p is not None else assistant.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "stop": req.stop or None,
        "presence_penalty": req.presence_penalty or None,
        "frequency_penalty": req.frequency_penalty or None,
        "logit_bias": {str(t): b for t, b in req.logit_bias.items()} or None,
        "n": req.n if req.n != 1 else None,
        "cache_salt": req.cache_salt,  # vLLM's; others ignore it
    }
    body.update((k, v) for k, v in optional.items() if v is not None)
    if req.repeat_penalty != 1.0:  # llama-server's name, and vLLM's
        body["repeat_penalty"] = body["repetition_penalty"] = req.repeat_penalty
    if req.repeat_last_n != DEFAULT_REPEAT_LAST_N:
        body["repeat_last_n"] = req.repeat_last_n
    if req.schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": req.schema},
        }
    elif req.grammar is not None:
        body["grammar"] = req.grammar
    if req.top_logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs
    if req.tools is not None:
        body.update(tool_fields(req.tools))
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    if req.raw_reasoning:
        body["reasoning_format"] = "none"
    return body


def tool_fields(tools: ToolUse) -> dict[str, Any]:
    choice: Any = tools.choice
    if tools.forced and choice != "required":
        choice = {"type": "function", "function": {"name": choice}}
    fields: dict[str, Any] = {"tools": tools.tools, "tool_choice": choice}
    if not tools.parallel:
        fields["parallel_tool_calls"] = False
    return fields


async def start_remote(
    online: Online, sessions: Sessions, gate: Gate, req: ChatRequest, session_id: str | None
) -> Generation:
    """Fit the history, admit the request, and send it upstream; the caller enters it."""
    assistant, remote = online.assistant, online.engine
    user = gate.caller.user.name
    max_tokens = max_tokens_for(req, assistant)
    lease, turns = await sessions.open(assistant, user, session_id)
    try:
        messages, estimate, fitted = fit_remote(
            assistant.system_prompt,
            turns,
            req.messages,
            assistant.ctx,
            max_tokens,
            lease is not None,
        )
        thinking = thinking_for(req, assistant)
        gate.check(estimate, req.n)
        job = RemoteJob(
            max_tokens=max_tokens,
            body=upstream_body(assistant, req, messages, thinking, max_tokens),
            session=(user, session_id) if session_id else None,
            prompt_estimate=estimate,
            choices=req.n,
            hold=not req.stream,
        )
        ticket = gate.admit(estimate, req.n, reserve=max_tokens * req.n)
        remote.submit(job)
        logprobs = req.top_logprobs is not None
        answers = [Answer(req.raw_reasoning, False, logprobs, None) for _ in range(req.n)]
        memory = Memory(sessions, lease, fitted, req.messages) if lease else None
        legacy = bool(req.tools and req.tools.legacy)
        return Generation(assistant, answers, [job], memory, ticket, legacy)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
