"""vergeai assistant …"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from vergeai.cli.common import (
    JsonOption,
    StateDirOption,
    YesOption,
    confirm,
    fail,
    failures,
    print_json,
    print_rows,
    print_table,
    say,
    store_for,
)
from vergeai.gguf import GgufError, check_gguf
from vergeai.runtime.templates import BUILTIN
from vergeai.state.records import Assistant, check_name

app = typer.Typer(
    help="Manage assistants: the names clients send as 'model'.", no_args_is_help=True
)

MAX_SYSTEM_PROMPT = 256 * 1024

ModelOpt = Annotated[Path | None, typer.Option("--model", help="Path of a GGUF model file.")]
ModelNameOpt = Annotated[
    str | None, typer.Option("--model-name", help="Display name of the underlying model.")
]
SystemPromptOpt = Annotated[
    str | None, typer.Option("--system-prompt", help="System prompt put before every chat.")
]
SystemPromptFileOpt = Annotated[
    Path | None, typer.Option("--system-prompt-file", help="Read the system prompt from a file.")
]
DisableThinkOpt = Annotated[
    bool | None,
    typer.Option("--disable-think/--enable-think", help="Suppress the model's thinking."),
]
ChatHistoryOpt = Annotated[
    bool | None,
    typer.Option("--chat-history/--no-chat-history", help="Remember sessions across calls."),
]
HistoryTurnsOpt = Annotated[
    int | None,
    typer.Option("--history-turns", min=1, max=10_000, help="Turns kept per session [50]."),
]
HistoryDaysOpt = Annotated[
    int | None,
    typer.Option(
        "--history-days", min=1, max=36_500, help="Idle days until a session expires [30]."
    ),
]
TemperatureOpt = Annotated[
    float | None, typer.Option(min=0.0, max=2.0, help="Default sampling temperature.")
]
TopPOpt = Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Default top-p.")]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", min=1, help="Default completion token limit.")
]
CtxOpt = Annotated[
    int | None, typer.Option("--ctx", min=16, help="Context size in tokens, per parallel slot.")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, max=1024, help="CPU threads [default: all].")
]
GpuLayersOpt = Annotated[
    int | None, typer.Option("--gpu-layers", min=-1, help="Layers to offload to a GPU; -1 = all.")
]
ChatFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--chat-format",
        help=f"Chat template for GGUFs without one: {', '.join(BUILTIN)}.",
    ),
]
ParallelOpt = Annotated[
    int | None, typer.Option("--parallel", min=1, max=64, help="Requests decoded together.")
]
MaxQueueOpt = Annotated[
    int | None, typer.Option("--max-queue", min=0, help="Requests that may wait; then 503.")
]
OnlineOpt = Annotated[
    bool | None, typer.Option("--online/--offline", help="Load the model when serving.")
]


def checked_model(path: Path) -> str:
    """The GGUF's absolute path, once the file is known to be a whole GGUF."""
    try:
        check_gguf(path)
    except GgufError as exc:
        fail(f"model file {path}: {exc.message}")
    return os.path.abspath(path)


def read_system_prompt(text: str | None, file: Path | None) -> str | None:
    if text is not None and file is not None:
        raise typer.BadParameter("give --system-prompt or --system-prompt-file, not both")
    if file is not None:
        try:
            if file.stat().st_size > MAX_SYSTEM_PROMPT:
                fail(f"{file} is over {MAX_SYSTEM_PROMPT} bytes")
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read system prompt file {file}: {exc}")
    if text is not None and len(text) > MAX_SYSTEM_PROMPT:
        fail(f"the system prompt is over {MAX_SYSTEM_PROMPT} characters")
    if text is not None and "\x00" in text:
        fail("the system prompt must not contain NUL characters")
    return text


def apply_settings(assistant: Assistant, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        if value is not None:
            setattr(assistant, key, value)


def settings_from(
    model: Path | None,
    model_name: str | None,
    system_prompt: str | None,
    system_prompt_file: Path | None,
    disable_think: bool | None,
    chat_history: bool | None,
    history_turns: int | None,
    history_days: int | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    ctx: int | None,
    threads: int | None,
    gpu_layers: int | None,
    chat_format: str | None,
    parallel: int | None,
    max_queue: int | None,
    online: bool | None,
) -> dict[str, Any]:
    if chat_format is not None and chat_format not in BUILTIN:
        raise typer.BadParameter(
            f"{chat_format!r} is not one of {', '.join(BUILTIN)}", param_hint="--chat-format"
        )
    if top_p is not None and top_p <= 0:
        raise typer.BadParameter("must be greater than 0", param_hint="--top-p")
    return {
        "model": checked_model(model) if model is not None else None,
        "model_name": model_name,
        "system_prompt": read_system_prompt(system_prompt, system_prompt_file),
        "disable_think": disable_think,
        "chat_history": chat_history,
        "history_turns": history_turns,
        "history_days": history_days,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "ctx": ctx,
        "threads": threads,
        "gpu_layers": gpu_layers,
        "chat_format": chat_format,
        "parallel": parallel,
        "max_queue": max_queue,
        "online": online,
    }


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The name clients send as 'model'.")],
    model: ModelOpt = None,
    model_name: ModelNameOpt = None,
    system_prompt: SystemPromptOpt = None,
    system_prompt_file: SystemPromptFileOpt = None,
    disable_think: DisableThinkOpt = None,
    chat_history: ChatHistoryOpt = None,
    history_turns: HistoryTurnsOpt = None,
    history_days: HistoryDaysOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    chat_format: ChatFormatOpt = None,
    parallel: ParallelOpt = None,
    max_queue: MaxQueueOpt = None,
    online: OnlineOpt = None,
    state_dir: StateDirOption = None,
) -> None:
    """Create an assistant on a GGUF model."""
    if model is None:
        raise typer.BadParameter("an assistant needs a GGUF file", param_hint="--model")
    with failures():
        check_name(name)
    settings = settings_from(
        model, model_name, system_prompt, system_prompt_file, disable_think, chat_history,
        history_turns, history_days, temperature, top_p, max_tokens, ctx, threads, gpu_layers,
        chat_format, parallel, max_queue, online,
    )  # fmt: skip
    with failures():
        assistant = Assistant(name=name, model=settings.pop("model"))
        apply_settings(assistant, settings)
        assistant.validate()
        with store_for(state_dir).transaction() as state:
            if name in state.assistants:
                fail(f"assistant {name!r} already exists")
            state.assistants[name] = assistant
    state_word = "online" if assistant.online else "offline"
    say(f"created assistant {name} on {assistant.model} ({state_word})")


@app.command("edit")
def edit(
    name: Annotated[str, typer.Argument(help="The assistant to change.")],
    model: ModelOpt = None,
    model_name: ModelNameOpt = None,
    system_prompt: SystemPromptOpt = None,
    system_prompt_file: SystemPromptFileOpt = None,
    disable_think: DisableThinkOpt = None,
    chat_history: ChatHistoryOpt = None,
    history_turns: HistoryTurnsOpt = None,
    history_days: HistoryDaysOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    chat_format: ChatFormatOpt = None,
    parallel: ParallelOpt = None,
    max_queue: MaxQueueOpt = None,
    online: OnlineOpt = None,
    state_dir: StateDirOption = None,
) -> None:
    """Change an assistant's settings; a running server applies them live."""
    settings = settings_from(
        model, model_name, system_prompt, system_prompt_file, disable_think, chat_history,
        history_turns, history_days, temperature, top_p, max_tokens, ctx, threads, gpu_layers,
        chat_format, parallel, max_queue, online,
    )  # fmt: skip
    if all(v is None for v in settings.values()):
        raise typer.BadParameter("nothing to change: give at least one setting")
    with failures(), store_for(state_dir).transaction() as state:
        assistant = state.assistants.get(name)
        if assistant is None:
            fail(f"no assistant named {name!r}")
        changed = dataclasses.replace(assistant)
        apply_settings(changed, settings)
        state.assistants[name] = changed.validate()
    say(f"updated assistant {name}")


def assistant_row(a: Assistant) -> dict[str, Any]:
    row = dataclasses.asdict(a)
    row["model_name"] = a.display_model
    return row


@app.command("list")
def list_assistants(json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """List assistants."""
    with failures():
        state = store_for(state_dir).load()
    rows = [assistant_row(a) for a in sorted(state.assistants.values(), key=lambda a: a.name)]
    columns = ["name", "model_name", "online", "ctx", "parallel", "chat_history", "disable_think"]
    print_rows("assistants", columns, rows, json_)


@app.command("show")
def show(name: str, json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """Show every setting of one assistant."""
    with failures():
        assistant = store_for(state_dir).load().assistants.get(name)
    if assistant is None:
        fail(f"no assistant named {name!r}")
    row = assistant_row(assistant)
    from vergeai.runtime.llama import LoadError  # loads llama.cpp: only for this command
    from vergeai.runtime.templating import inspect_template

    try:
        choice = inspect_template(assistant)
        row["chat_template"] = choice.origin
        row["thinking_control"] = choice.thinking_control
    except LoadError as exc:
        row["chat_template"] = f"unreadable: {exc.message}"
        row["thinking_control"] = "unknown"
    if json_:
        print_json(row)
        return
    print_table(f"assistant {name}", ["setting", "value"], sorted(row.items()))


def _set_online(name: str, online: bool, state_dir: Path | None) -> None:
    with failures(), store_for(state_dir).transaction() as state:
        assistant = state.assistants.get(name)
        if assistant is None:
            fail(f"no assistant named {name!r}")
        assistant.online = online
    say(f"assistant {name} is now {'online' if online else 'offline'}")


@app.command("online")
def online_cmd(name: str, state_dir: StateDirOption = None) -> None:
    """Bring an assistant online: the server loads its model."""
    _set_online(name, True, state_dir)


@app.command("offline")
def offline_cmd(name: str, state_dir: StateDirOption = None) -> None:
    """Take an assistant offline: in-flight requests finish, then the model is freed."""
    _set_online(name, False, state_dir)


@app.command("delete")
def delete(name: str, yes: YesOption = False, state_dir: StateDirOption = None) -> None:
    """Delete an assistant."""
    store = store_for(state_dir)
    with failures():
        if name not in store.load().assistants:
            fail(f"no assistant named {name!r}")
    confirm(f"Delete assistant {name}?", yes)
    with failures(), store.transaction() as state:
        if state.assistants.pop(name, None) is None:
            fail(f"no assistant named {name!r}")
    say(f"deleted assistant {name}")
