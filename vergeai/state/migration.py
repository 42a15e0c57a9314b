"""State dirs from before models were records: each local assistant held its GGUF's path
and load settings. They are read as model records here, and written in the new form by
the next write (``vergeai serve`` makes one at start); the old file is kept beside.

Two assistants with the same file and settings share one model. A model is
``always`` loaded when an online assistant was on it (as it was), else
``on-demand``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vergeai.state.models import ModelRecord, find_or_add, is_model_file
from vergeai.state.schema import RecordError

# settings of v1 remote assistants that no longer exist (always false for them)
DROPPED_REMOTE = ("embedding",)


def is_v1(table: dict[str, Any]) -> bool:
    """An assistant's table in the form before model records."""
    if table.get("upstream"):
        return any(key in table for key in DROPPED_REMOTE)
    model = table.get("model")
    if isinstance(model, str) and is_model_file(model):
        return True
    return any(key in table for key in ModelRecord.ASSISTANT_SETTINGS)


def migrate(tables: dict[str, Any], models: dict[str, ModelRecord]) -> dict[str, Any]:
    """Assistant tables in the new form; the models they need are added to ``models``."""
    out: dict[str, Any] = {}
    for name, table in tables.items():
        if not isinstance(table, dict) or not is_v1(table):
            out[name] = table
            continue
        try:
            out[name] = _migrate(dict(table), models)
        except RecordError as exc:
            why = str(exc).split(": ", 1)[1]
            raise RecordError(f"[assistants.{name}] {exc.field_name}", why) from None
    return out


def _migrate(table: dict[str, Any], models: dict[str, ModelRecord]) -> dict[str, Any]:
    if table.get("upstream"):
        for key in DROPPED_REMOTE:
            if table.pop(key, False):
                raise RecordError(key, "upstream servers serve chat assistants only")
        return table
    settings = {k: table.pop(k) for k in ModelRecord.ASSISTANT_SETTINGS if k in table}
    model = table.get("model")
    if not isinstance(model, str) or not model:
        raise RecordError("model", "must name a GGUF file or a model")
    if is_model_file(model):
        wanted = ModelRecord.from_toml("migrated", {"file": model, **settings})
    else:  # a name, with load settings beside it: a copy of that model with them
        base = models.get(model)
        if base is None:
            raise RecordError("model", f"no model named {model!r}")
        wanted = ModelRecord.from_toml(model, {**base.to_toml(), **settings})
    found = find_or_add(models, replace(wanted, load="on-demand"))
    if table.get("online", True) is not False:
        models[found].load = "always"  # as it was: loaded at start, kept
    table["model"] = found
    return table
