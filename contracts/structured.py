"""JSON Schemas that constrain generated output: what a grammar can enforce, and the first keyword it cannot."""

from __future__ import annotations

import re
from typing import Any

from contracts.errors import InferBusError

# Constrain nothing: validators ignore them, and so may the grammar.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "$defs", "definitions",
})
# Enforced by the grammar (llama.cpp's JSON-schema converter), under the conditions `unsupported` checks.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "pattern", "format", "minLength", "maxLength",
})
# Known keywords a grammar cannot enforce: refused, so that what validates is what we promise.
REFUSED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "oneOf", "allOf", "not",
    "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$anchor", "$dynamicAnchor",
    "$recursiveRef", "contentEncoding", "contentMediaType", "contentSchema", "nullable",
})
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
MAX_NODES = 4096
MAX_DEPTH = 64
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class _Walk:
    def __init__(self, root: dict[str, Any], param: str) -> None:
        self.root = root
        self.param = param
        self.nodes = 0

    def fail(self, path: str, message: str) -> InferBusError:
        where = f"{self.param}{path}"
        return InferBusError("unsupported_parameter", f"{where}: {message}", param=where)

    def visit(self, node: Any, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            raise self.fail(path, f"the schema is too large (at most {MAX_NODES} subschemas, {MAX_DEPTH} deep)")
        if isinstance(node, bool):
            if not node:
                raise self.fail(path, "the schema `false` matches nothing")
            return
        if not isinstance(node, dict):
            raise self.fail(path, "a schema must be an object")
        for key in node:
            if key in REFUSED:
                raise self.fail(f"{path}.{key}", f"the JSON Schema keyword '{key}' is not supported")
        kind = node.get("type")
        if isinstance(kind, list):
            if not kind or any(t not in TYPES for t in kind):
                raise self.fail(f"{path}.type", f"unknown type in {kind!r}")
            if set(node) - ANNOTATIONS - {"type"}:
                raise self.fail(f"{path}.type", "a list of types with other keywords is not supported: use anyOf")
        elif kind is not None and kind not in TYPES:
            raise self.fail(f"{path}.type", f"unknown type {kind!r}")
        if "$ref" in node:
            self.ref(node["$ref"], f"{path}.$ref")
        if (fmt := node.get("format")) is not None and fmt not in FORMATS:
            raise self.fail(f"{path}.format", f"format '{fmt}' is not supported (only {', '.join(sorted(FORMATS))})")
        if "pattern" in node and ({"minLength", "maxLength", "format"} & set(node)):
            raise self.fail(f"{path}.pattern", "pattern together with minLength, maxLength or format is not supported")
        if "format" in node and {"minLength", "maxLength"} & set(node):
            raise self.fail(f"{path}.format", "format together with minLength or maxLength is not supported")
        self.children(node, path, depth)

    def children(self, node: dict[str, Any], path: str, depth: int) -> None:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise self.fail(f"{path}.properties", "properties must be an object")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(f"{path}.required", "required must be a list of property names")
        if missing := [r for r in required if r not in props]:
            raise self.fail(f"{path}.required", f"required names properties not in properties: {missing}")
        for name, sub in props.items():
            self.visit(sub, f"{path}.properties.{name}", depth + 1)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self.visit(extra, f"{path}.additionalProperties", depth + 1)
        items = node.get("items")
        if isinstance(items, list):
            raise self.fail(f"{path}.items", "items as a list is not supported: use prefixItems")
        if isinstance(items, dict):
            self.visit(items, f"{path}.items", depth + 1)
        if "prefixItems" in node:
            prefix = node["prefixItems"]
            if not isinstance(prefix, list):
                raise self.fail(f"{path}.prefixItems", "prefixItems must be a list of schemas")
            if {"items", "minItems", "maxItems"} & set(node):
                raise self.fail(f"{path}.prefixItems", "prefixItems with items, minItems or maxItems is not supported")
            for i, sub in enumerate(prefix):
                self.visit(sub, f"{path}.prefixItems[{i}]", depth + 1)
        if "anyOf" in node:
            alternatives = node["anyOf"]
            if not isinstance(alternatives, list) or not alternatives:
                raise self.fail(f"{path}.anyOf", "anyOf must be a non-empty list of schemas")
            if set(node) - ANNOTATIONS - {"anyOf"}:
                raise self.fail(f"{path}.anyOf", "anyOf beside other keywords is not supported: move them inside")
            for i, sub in enumerate(alternatives):
                self.visit(sub, f"{path}.anyOf[{i}]", depth + 1)
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise self.fail(f"{path}.enum", "enum must be a non-empty list")
        for key in ("$defs", "definitions"):
            defs = node.get(key)
            if isinstance(defs, dict):
                for name, sub in defs.items():
                    self.visit(sub, f"{path}.{key}.{name}", depth + 1)

    def ref(self, ref: Any, path: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(path, f"only local references ('#/$defs/...') are supported, not {ref!r}")
        target: Any = self.root
        for part in ref.split("/")[1:]:
            if not isinstance(target, dict) or part not in target:
                raise self.fail(path, f"{ref} does not resolve")
            target = target[part]


def check_schema(schema: Any, param: str) -> None:
    """Raise `unsupported_parameter` naming the first keyword a grammar cannot enforce (param: where it is)."""
    if not isinstance(schema, dict):
        raise InferBusError("unsupported_parameter", f"{param}: a schema must be an object", param=param)
    _Walk(schema, param).visit(schema, "", 0)


def strip_annotations(node: Any) -> Any:
    """The schema without annotation keywords, for grammar converters that read every key as a constraint."""
    if isinstance(node, list):
        return [strip_annotations(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ANNOTATIONS and key not in ("$defs", "definitions"):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: strip_annotations(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "required"):
            out[key] = value  # values, not schemas
        else:
            out[key] = strip_annotations(value)
    return out
