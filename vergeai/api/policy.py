"""Where a chat request and its assistant meet: thinking on or off, the grammar to follow."""

from __future__ import annotations

from vergeai.api.fields import Sampled, grammar_spec
from vergeai.api.schemas import ChatRequest
from vergeai.api.tools import ToolUse
from vergeai.runtime.constraint import GrammarSpec
from vergeai.runtime.toolformats import ToolFormat
from vergeai.state.assistants import Assistant


def grammar_of(req: Sampled, tools: ToolUse | None, fmt: ToolFormat | None) -> GrammarSpec | None:
    """What the output must follow: the tools' calls (or the answer), else the request's own.

    Under tool_choice auto without a response_format, the calls' grammar
    applies from where the model starts one. (A trigger inside a thinking
    model's reasoning would start it there too; llama.cpp's server shares
    that limit.)
    """
    if tools is None or fmt is None:
        return grammar_spec(req)
    return tools.grammar(fmt, req.schema, lazy=not tools.forced and req.schema is None)


def thinking_for(req: ChatRequest, assistant: Assistant) -> bool | None:
    """enable_thinking for the template: the request's, else off if the assistant says so.

    A grammar from the first token on (structured output, forced tool calls)
    leaves no room to think first, so it turns thinking off too.
    """
    if req.schema is not None or (req.tools is not None and req.tools.forced):
        return False
    if req.enable_thinking is None and assistant.disable_think:
        return False
    return req.enable_thinking
