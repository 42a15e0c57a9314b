"""A chat request's start: on the model here, or sent to the assistant's upstream servers."""

from __future__ import annotations

from vergeai.api.conversation import Sessions
from vergeai.api.engines import Local, Online
from vergeai.api.generation import Generation
from vergeai.api.local import start_local
from vergeai.api.remote import start_remote
from vergeai.api.schemas import ChatRequest
from vergeai.limits import Gate


async def start(
    online: Online, sessions: Sessions, gate: Gate, req: ChatRequest, session_id: str | None
) -> Generation:
    """Prepare the prompt and submit the job; the caller enters the Generation."""
    if online.facts is None:  # the model is not here: upstream servers answer
        return await start_remote(online, sessions, gate, req, session_id)
    local = Local(online.assistant, online.engine, online.facts)
    return await start_local(local, sessions, gate, req, session_id)
