"""vergeai assistant …"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer

import vergeai.cli.settings as settings
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
from vergeai.state.assistants import Assistant, check_upstream_url
from vergeai.state.schema import RecordError, check_name

app = typer.Typer(
    help="Manage assistants: the names clients send as 'model'.", no_args_is_help=True
)

MAX_SYSTEM_PROMPT = 256 * 1024
TEMPLATE_SETTINGS = ("model", "chat_format", "embedding", "upstream")  # what may need a template


def checked_model(path: Path) -> str:
    """The GGUF's absolute path, once the file is known to be a whole GGUF."""
    try:
        check_gguf(path)
    except GgufError as exc:
        fail(f"model file {path}: {exc.message}")
    return os.path.abspath(path)


def check_chat_template(assistant: Assistant) -> None:
    """A chat assistant on a GGUF without its own chat template needs --chat-format,
    said now rather than when the server fails to load it."""
    if assistant.remote or assistant.embedding or assistant.chat_format:
        return
    try:
        has_template = check_gguf(assistant.model).chat_template
    except GgufError as exc:
        fail(f"model file {assistant.model}: {exc.message}")
    if not has_template:
        fail(
            f"model file {assistant.model} has no chat template: give --chat-format NAME "
            f"(one of {', '.join(sorted(BUILTIN))}), or --embedding for an embedding model"
        )


def warn_without_gpu(assistant: Assistant) -> None:
    if assistant.remote or not assistant.gpu_layers:
        return
    from vergeai.runtime.llama import GPU_WARNING, gpu_offload  # loads llama.cpp: only here

    if not gpu_offload():
        say("warning: " + GPU_WARNING.format(assistant.gpu_layers))


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


NameArg = Annotated[str, typer.Argument(help="The name clients send as 'model'.")]
UpstreamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--upstream",
        help="Base URL of an OpenAI-compatible server (vLLM, llama-server, vergeai) that "
        "answers for this assistant instead of a GGUF; repeat for replicas. On edit, replaces "
        "the list; 'none' makes the assistant local again.",
        metavar="URL",
    ),
]
PromptFileOpt = Annotated[
    Path | None,
    typer.Option("--system-prompt-file", help="Read the system prompt from a file."),
]


def _model(text: str) -> str:
    return checked_model(Path(text))


def _params(editing: bool) -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=NameArg),
        *settings.options(Assistant, editing, parsers={"model": _model}),
        inspect.Parameter("upstream", keyword, default=None, annotation=UpstreamOpt),
        inspect.Parameter("system_prompt_file", keyword, default=None, annotation=PromptFileOpt),
        inspect.Parameter("state_dir", keyword, default=None, annotation=StateDirOption),
    ]


def upstream_urls(given: list[str] | None, editing: bool) -> list[str] | None:
    """The --upstream URLs (each may also hold several, comma-separated), checked."""
    if given is None:
        return None
    if editing and given == [settings.UNSET]:
        return []
    urls = [url.strip() for item in given for url in item.split(",") if url.strip()]
    if not urls:
        raise typer.BadParameter("give at least one URL", param_hint="--upstream")
    for url in urls:
        try:
            check_upstream_url(url)
        except RecordError as exc:
            raise typer.BadParameter(str(exc).split(": ", 1)[1], param_hint="--upstream") from None
    return urls


def create(
    name: str,
    upstream: list[str] | None,
    system_prompt_file: Path | None,
    state_dir: Path | None,
    **values: Any,
) -> None:
    """Create an assistant on a GGUF model, or on upstream servers (--upstream)."""
    urls = upstream_urls(upstream, editing=False)
    if values["model"] is None and urls is None:
        raise typer.BadParameter(
            "an assistant needs a GGUF file, or upstream servers (--upstream URL)",
            param_hint="--model",
        )
    with failures():
        check_name(name)
    values["system_prompt"] = read_system_prompt(values["system_prompt"], system_prompt_file)
    with failures():
        assistant = Assistant(name=name, upstream=urls or [])
        settings.apply(assistant, values)
        assistant.validate()
        check_chat_template(assistant)
        warn_without_gpu(assistant)
        with store_for(state_dir).transaction() as state:
            if name in state.assistants:
                fail(f"assistant {name!r} already exists")
            state.assistants[name] = assistant
    state_word = "online" if assistant.online else "offline"
    where = ", ".join(assistant.upstream) if assistant.remote else assistant.model
    say(f"created assistant {name} on {where} ({state_word})")


def edit(
    name: str,
    upstream: list[str] | None,
    system_prompt_file: Path | None,
    state_dir: Path | None,
    **values: Any,
) -> None:
    """Change an assistant's settings; a running server applies them live."""
    urls = values["upstream"] = upstream_urls(upstream, editing=True)
    if urls is not None:  # a switch of kind puts the other kind's settings back to defaults
        others = Assistant.LOCAL_ONLY if urls else Assistant.REMOTE_ONLY
        for setting in others:
            if values.get(setting) is None:
                values[setting] = settings.CLEAR
    values["system_prompt"] = read_system_prompt(values["system_prompt"], system_prompt_file)
    with failures(), store_for(state_dir).transaction() as state:
        settings.edit_in(state.assistants, "assistant", name, values)
        if any(values.get(k) is not None for k in TEMPLATE_SETTINGS):
            check_chat_template(state.assistants[name])
        if values.get("gpu_layers") is not None:
            warn_without_gpu(state.assistants[name])
    say(f"updated assistant {name}")


app.command("create")(settings.command(_params(editing=False), create))
app.command("edit")(settings.command(_params(editing=True), edit))


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
    if assistant.remote:
        row["chat_template"] = "the upstream's"
        row["thinking_control"] = "chat_template_kwargs.enable_thinking, sent upstream"
        show_row(name, row, json_)
        return
    from vergeai.runtime.llama import LoadError  # loads llama.cpp: only for this command
    from vergeai.runtime.templating import inspect_template

    try:
        choice = inspect_template(assistant)
        row["chat_template"] = choice.origin
        row["thinking_control"] = choice.thinking_control
    except LoadError as exc:
        row["chat_template"] = f"unreadable: {exc.message}"
        row["thinking_control"] = "unknown"
    show_row(name, row, json_)


def show_row(name: str, row: dict[str, Any], json_: bool) -> None:
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
