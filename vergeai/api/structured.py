"""Structured output: ``response_format`` (and llama-server's ``json_schema``) to a GBNF grammar.

The conversion is llama.cpp's JSON-schema-to-grammar, as llama-cpp-python
ships it. Keywords it would silently ignore, so that the output could break
the schema, are refused with a 400 naming them; ``format`` is an
annotation in JSON Schema and is kept where the converter knows it
(date, time, date-time, uuid) and otherwise not enforced.
"""

from __future__ import annotations

from typing import Any

from vergeai.errors import InvalidRequest
from vergeai.runtime.llama import json_schema_to_gbnf

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# keywords that constrain values but that the converter does not implement
UNSUPPORTED = (
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "uniqueItems",
    "multipleOf",
    "propertyNames",
    "minimum",  # llama-cpp-python's port of the converter has no number ranges
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minProperties",
    "maxProperties",
)


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


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """GBNF for a JSON schema, or a 400 naming what cannot be enforced."""
    _check_keywords(schema, param)
    try:
        return json_schema_to_gbnf({"root": schema})
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        reason = str(exc).split("\n", 1)[0][:200] or type(exc).__name__
        raise _bad(param, f"this JSON schema cannot be enforced: {reason}") from None


def relaxed(schema: Any) -> Any:
    """The schema without the keywords the grammar cannot hold (tools' schemas are relaxed)."""
    if isinstance(schema, list):
        return [relaxed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: (
            {name: relaxed(child) for name, child in value.items()}
            if key in NAMED and isinstance(value, dict)
            else relaxed(value)
        )
        for key, value in schema.items()
        if key not in UNSUPPORTED
    }


NAMED = ("properties", "$defs", "definitions")  # maps of names to schemas


def _check_keywords(schema: Any, param: str) -> None:
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key in UNSUPPORTED and not path.endswith(NAMED):
                    where = f"{path}/{key}" if path else key
                    raise _bad(
                        param,
                        f"the JSON schema keyword '{where}' is not supported: the output "
                        "could not be held to it",
                    )
                stack.append((child, f"{path}/{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((child, f"{path}/{i}") for i, child in enumerate(node))
