"""Structured output: ``response_format`` (and llama-server's ``json_schema``) read and bounded.

The schema is enforced by llguidance (:mod:`vergeai.runtime.constraint`),
which refuses, with a 400 naming it, a keyword it cannot hold the output to;
``format`` is an annotation in JSON Schema and is enforced where llguidance
knows it. Here a schema is only bounded in size before anything compiles it.
"""

from __future__ import annotations

import json
from typing import Any

from vergeai.errors import InvalidRequest

ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA = 256 * 1024  # characters of a schema's JSON (tools' schemas all together)


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {message}", param=param)


def response_format_schema(value: Any) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for; None for plain text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise _bad("response_format", "'type' must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "must be an object with a 'schema'")
    schema = spec.get("schema", ANY_OBJECT)
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema", "must be a JSON schema object")
    return schema


def check_schema(schema: Any, param: str, limit: int = MAX_SCHEMA) -> None:
    """A 400 if a schema is too long to compile (its depth is bounded with the body's)."""
    if len(json.dumps(schema, ensure_ascii=False)) > limit:
        raise _bad(param, f"the JSON schema is longer than {limit} characters")
