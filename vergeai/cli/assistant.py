"""vergeai assistant …"""

from __future__ import annotations

import dataclasses
import inspect
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
from vergeai.cli.model import checked_file, place
from vergeai.state.assistants import Assistant, check_upstream_url
from vergeai.state.models import ModelRecord, is_model_file
from vergeai.state.schema import RecordError, check_name
from vergeai.state.store import State

app = typer.Typer(
    help="Manage assistants: the names clients send as 'model'.", no_args_is_help=True
)

MAX_SYSTEM_PROMPT = 256 * 1024
# the model's load settings an assistant's command takes (--ctx is also an upstream's)
MODEL_OPTIONS = tuple(s for s in ModelRecord.ASSISTANT_SETTINGS if s != "ctx")


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
    """A model's name, or a GGUF file's path (checked, made absolute)."""
    return checked_file(text) if is_model_file(text) else text


def _params(editing: bool) -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=NameArg),
        *settings.options(Assistant, editing, parsers={"model": _model}),
        *settings.options(ModelRecord, editing, only=MODEL_OPTIONS),
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
    """Create an assistant on a model (or a GGUF file), or on upstream servers (--upstream)."""
    urls = upstream_urls(upstream, editing=False)
    if values["model"] is None and urls is None:
        raise typer.BadParameter(
            "an assistant needs a model or a GGUF file, or upstream servers (--upstream URL)",
            param_hint="--model",
        )
    with failures():
        check_name(name)
    values["system_prompt"] = read_system_prompt(values["system_prompt"], system_prompt_file)
    load = _load_settings(values, remote=bool(urls))
    with failures():
        assistant = Assistant(name=name, upstream=urls or [])
        settings.apply(assistant, values)
        with store_for(state_dir).transaction() as state:
            if name in state.assistants:
                fail(f"assistant {name!r} already exists")
            if not assistant.remote:
                assistant.model = place(state, assistant.model, load, name)
            state.assistants[name] = assistant.validate()
    state_word = "online" if assistant.online else "offline"
    where = ", ".join(assistant.upstream) if assistant.remote else f"model {assistant.model}"
    say(f"created assistant {name} on {where} ({state_word})")


def _load_settings(values: dict[str, Any], remote: bool) -> dict[str, Any]:
    """The model's settings among the options given (taken out of ``values``); an
    upstream's assistant takes none but --ctx."""
    load = {k: values.pop(k) for k in MODEL_OPTIONS}
    given = [k for k, v in load.items() if v is not None]
    if remote and given:
        flag = settings.flag_of(given[0])
        why = "a setting of models here; upstream servers serve chat assistants with their own"
        raise typer.BadParameter(why, param_hint=flag)
    if not remote:
        load["ctx"] = values.pop("ctx")
    return load


def edit(
    name: str,
    upstream: list[str] | None,
    system_prompt_file: Path | None,
    state_dir: Path | None,
    **values: Any,
) -> None:
    """Change an assistant's settings; a running server applies them live."""
    urls = values["upstream"] = upstream_urls(upstream, editing=True)
    values["system_prompt"] = read_system_prompt(values["system_prompt"], system_prompt_file)
    with failures(), store_for(state_dir).transaction() as state:
        current = state.assistants.get(name)
        if current is None:
            fail(f"no assistant named {name!r}")
        remote = bool(urls) if urls is not None else current.remote
        load = _load_settings(values, remote)
        if urls is not None:  # a switch of kind puts the other kind's settings back to defaults
            for setting in Assistant.LOCAL_ONLY if urls else Assistant.REMOTE_ONLY:
                if values.get(setting) is None:
                    values[setting] = settings.CLEAR
        if not remote and (values["model"] or any(v is not None for v in load.values())):
            model = values["model"] if isinstance(values["model"], str) else current.model
            if not model:
                fail("an assistant on a model here needs --model (a model or a GGUF file)")
            values["model"] = place(state, model, load, name)
        settings.edit_in(state.assistants, "assistant", name, values)
    say(f"updated assistant {name}")


app.command("create")(settings.command(_params(editing=False), create))
app.command("edit")(settings.command(_params(editing=True), edit))


def assistant_row(state: State, a: Assistant) -> dict[str, Any]:
    """Its settings, with its model's that the assistant's commands take (as before
    models were records: what it runs with, in one place)."""
    row = dataclasses.asdict(a)
    row["model_name"] = state.display_model(a)
    if (spec := state.model_of(a)) is not None:
        row |= {k: getattr(spec, k) for k in ModelRecord.ASSISTANT_SETTINGS}
    return row


@app.command("list")
def list_assistants(json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """List assistants."""
    with failures():
        state = store_for(state_dir).load()
    rows = [
        assistant_row(state, a) for a in sorted(state.assistants.values(), key=lambda a: a.name)
    ]
    columns = ["name", "model", "model_name", "online", "chat_history", "disable_think"]
    print_rows("assistants", columns, rows, json_)


@app.command("show")
def show(name: str, json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """Show every setting of one assistant."""
    with failures():
        state = store_for(state_dir).load()
    assistant = state.assistants.get(name)
    if assistant is None:
        fail(f"no assistant named {name!r}")
    row = assistant_row(state, assistant)
    if assistant.remote:
        row["chat_template"] = "the upstream's"
        row["thinking_control"] = "chat_template_kwargs.enable_thinking, sent upstream"
        show_row(name, row, json_)
        return
    from vergeai.runtime.llama import LoadError  # loads llama.cpp: only for this command
    from vergeai.runtime.templating import inspect_template

    spec = state.model_of(assistant)
    if spec is None:
        row["chat_template"] = row["thinking_control"] = "unknown: its model is not defined"
        show_row(name, row, json_)
        return
    row["model_file"] = spec.file
    try:
        choice = inspect_template(spec)
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
    """Bring an assistant online: it answers again (its model loads as the model says)."""
    _set_online(name, True, state_dir)


@app.command("offline")
def offline_cmd(name: str, state_dir: StateDirOption = None) -> None:
    """Take an assistant offline: it answers no more requests (its model stays, as the
    model says)."""
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
