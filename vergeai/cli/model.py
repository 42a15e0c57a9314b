"""vergeai model …: the GGUF files assistants run, and how each is loaded."""

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
from vergeai.state.models import ModelRecord, find_or_add, is_model_file, same_settings
from vergeai.state.schema import check_name
from vergeai.state.store import State

app = typer.Typer(
    help="Manage models: GGUF files and how they are loaded; assistants name one.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="The model's name (assistants name it).")]
TEMPLATE_SETTINGS = ("file", "chat_format", "embedding")  # what may need a chat template


def checked_file(text: str) -> str:
    """The GGUF's absolute path, once the file is known to be a whole GGUF."""
    path = Path(text)
    try:
        check_gguf(path)
    except GgufError as exc:
        fail(f"model file {path}: {exc.message}")
    return os.path.abspath(path)


def check_chat_template(spec: ModelRecord) -> None:
    """A chat model whose GGUF has no chat template needs --chat-format, said now rather
    than when the server fails to load it."""
    if spec.embedding or spec.chat_format:
        return
    try:
        has_template = check_gguf(spec.file).chat_template
    except GgufError as exc:
        fail(f"model file {spec.file}: {exc.message}")
    if not has_template:
        fail(
            f"model file {spec.file} has no chat template: give --chat-format NAME "
            f"(one of {', '.join(sorted(BUILTIN))}), or --embedding for an embedding model"
        )


def warn_without_gpu(spec: ModelRecord) -> None:
    if not spec.gpu_layers:
        return
    from vergeai.runtime.llama import GPU_WARNING, gpu_offload  # loads llama.cpp: only here

    if not gpu_offload():
        say("warning: " + GPU_WARNING.format(spec.gpu_layers))


def checked(spec: ModelRecord, given: dict[str, Any]) -> ModelRecord:
    """The record validated, and its file checked where what was given may need it."""
    spec.validate()
    if any(given.get(k) is not None for k in TEMPLATE_SETTINGS):
        check_chat_template(spec)
    if given.get("gpu_layers") is not None:
        warn_without_gpu(spec)
    return spec


def place(state: State, model: str, given: dict[str, Any], assistant: str) -> str:
    """The model an assistant runs, from its ``--model`` (a model's name or a GGUF file's
    path) and the load settings given beside it (the form before models were records).

    A path takes a model loading that file with those settings (over those of
    the assistant's model, if it has one), or a new one (loaded ``always``, as
    assistants' models were). Settings given with a name
    change that model when no other assistant runs it, else make a copy.
    """
    current = state.model_of(state.assistants[assistant]) if assistant in state.assistants else None
    if is_model_file(model):
        # another file for an assistant keeps its model's other settings
        wanted = ModelRecord(name="new", file=model, load="always")
        if current is not None:
            wanted = dataclasses.replace(current, name="new", file=model)
        settings.apply(wanted, given)
        checked(wanted, {**given, "file": model})
        return find_or_add(state.models, wanted)
    base = state.models.get(model)
    if base is None:
        fail(f"no model named {model!r} (see vergeai model list), nor a GGUF file's path")
    changed = dataclasses.replace(base)
    settings.apply(changed, given)
    if same_settings(changed, base):
        return model
    checked(changed, given)
    others = [n for n in state.assistants_on(model) if n != assistant]
    if not others:
        state.models[model] = changed
        return model
    return find_or_add(state.models, changed)


def _params(editing: bool) -> list[inspect.Parameter]:
    return [
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=NameArg),
        *settings.options(ModelRecord, editing, parsers={"file": checked_file}),
        inspect.Parameter(
            "state_dir", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=StateDirOption
        ),
    ]


def add(name: str, state_dir: Path | None, **values: Any) -> None:
    """Add a model: a GGUF file and the settings it is loaded with."""
    if values["file"] is None:
        raise typer.BadParameter("a model needs its GGUF file", param_hint="--file")
    with failures():
        check_name(name)
        spec = ModelRecord(name=name)
        settings.apply(spec, values)
        checked(spec, values)
        with store_for(state_dir).transaction() as state:
            if name in state.models:
                fail(f"model {name!r} already exists")
            state.models[name] = spec
    say(f"added model {name} ({spec.file}, loaded {spec.load})")


def edit(name: str, state_dir: Path | None, **values: Any) -> None:
    """Change a model's settings; a running server reloads it if they need it."""
    with failures(), store_for(state_dir).transaction() as state:
        settings.edit_in(state.models, "model", name, values)
        checked(state.models[name], values)
    say(f"updated model {name}")


app.command("add")(settings.command(_params(editing=False), add))
app.command("edit")(settings.command(_params(editing=True), edit))


def model_row(state: State, spec: ModelRecord) -> dict[str, Any]:
    row = dataclasses.asdict(spec)
    row["assistants"] = state.assistants_on(spec.name)
    return row


@app.command("list")
def list_models(json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """List models, with the assistants on each."""
    from vergeai.cli.workers import memory_text
    from vergeai.state.admin_socket import ask

    store = store_for(state_dir)
    with failures():
        state = store.load()
    running = ask(store.root, "workers", timeout=2.0) if store.root.exists() else None
    infos = running.get("model_info", {}) if running else {}
    rows = []
    for name, spec in sorted(state.models.items()):
        row = model_row(state, spec)
        info = infos.get(name) or {"state": "not running", **_estimated(spec)}
        row.update(info)
        row["memory"] = memory_text(info)
        rows.append(row)
    columns = ["name", "file", "load", "ctx", "parallel", "assistants", "state", "memory"]
    print_rows("models", columns, rows, json_)


def _estimated(spec: ModelRecord) -> dict[str, Any]:
    from vergeai.runtime.memory import estimate

    try:
        return {"estimated_bytes": estimate(spec).total, "measured_bytes": None}
    except GgufError:
        return {"estimated_bytes": None, "measured_bytes": None}


@app.command("show")
def show(name: str, json_: JsonOption = False, state_dir: StateDirOption = None) -> None:
    """Show every setting of one model."""
    with failures():
        state = store_for(state_dir).load()
    spec = state.models.get(name)
    if spec is None:
        fail(f"no model named {name!r}")
    row = model_row(state, spec)
    if json_:
        print_json(row)
        return
    print_table(f"model {name}", ["setting", "value"], sorted(row.items()))


@app.command("remove")
def remove(name: str, yes: YesOption = False, state_dir: StateDirOption = None) -> None:
    """Remove a model no assistant runs (its file stays)."""
    store = store_for(state_dir)
    with failures():
        if name not in store.load().models:
            fail(f"no model named {name!r}")
    confirm(f"Remove model {name}?", yes)
    with failures(), store.transaction() as state:
        if name not in state.models:
            fail(f"no model named {name!r}")
        users = state.assistants_on(name)
        if users:
            fail(f"assistants run model {name!r}: {', '.join(users)}; move or delete them first")
        del state.models[name]
    say(f"removed model {name}")


def _ask(verb: str, name: str, state_dir: Path | None) -> None:
    from vergeai.state.admin_socket import ask

    root = store_for(state_dir).root
    reply = ask(root, f"{verb} {name}", timeout=30.0)
    if reply is None:
        fail(f"the server is not running (start it with: vergeai serve --state-dir {root})", 3)
    if "error" in reply:
        fail(str(reply["error"]))
    say(f"model {name} is {reply['state']}")


@app.command("load")
def load(name: str, state_dir: StateDirOption = None) -> None:
    """Have the running server load a model now (it answers while loading)."""
    _ask("load", name, state_dir)


@app.command("unload")
def unload(name: str, state_dir: StateDirOption = None) -> None:
    """Have the running server unload a model: requests in flight finish first."""
    _ask("unload", name, state_dir)
