"""What an API server refuses in a CRD's schema when the CRD is applied (apiextensions.k8s.io/v1:
the schema must be structural, its defaults pruned and valid, a map list keyed by
fields every entry has). The tests never send our CRD to a real API server, so a schema it
would refuse, which fails `helm install` on every cluster, is caught here instead."""

from __future__ import annotations

from typing import Any

from crd_admission import pruned, schema_violations

TYPES = {"object", "array", "string", "integer", "number", "boolean"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# Not allowed inside a junctor: what the node itself must say.
NOT_IN_JUNCTORS = ("description", "type", "default", "additionalProperties", "nullable")
METADATA_RESTRICTABLE = {"name", "generateName"}


def schema_problems(schema: dict[str, Any]) -> list[str]:
    """`path: why` of each thing the API server would refuse in `schema` (an openAPIV3Schema)."""
    problems = [] if schema.get("type") == "object" else ["<root>: type must be object"]
    problems += _node_problems(schema, "")
    metadata = (schema.get("properties") or {}).get("metadata")
    if metadata is not None:
        restricted = (set(metadata) - {"type", "description", "properties"}) | (
            set(metadata.get("properties") or {}) - METADATA_RESTRICTABLE)
        if restricted:
            problems.append(f"metadata: only metadata.name and metadata.generateName may be restricted, "
                            f"not {sorted(restricted)}")
    return problems


def _node_problems(node: dict[str, Any], path: str) -> list[str]:
    where = path or "<root>"
    problems = []
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if node.get("type") not in TYPES and not (free and "type" not in node):
        problems.append(f"{where}: type must be one of {sorted(TYPES)}, not {node.get('type')!r}")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{where}: additionalProperties cannot be false")
    for junctor in JUNCTORS:
        for inner in _as_list(node.get(junctor)):
            problems += [f"{where}.{junctor}: {key} is not allowed inside it" for key in NOT_IN_JUNCTORS if key in inner]
            problems += [f"{where}.{junctor}: {name} is not specified outside it"
                         for name in inner.get("properties") or {} if name not in (node.get("properties") or {})]
    if "default" in node:
        problems += _default_problems(node, where)
    if node.get("x-kubernetes-list-type") == "map":
        problems += _map_list_problems(node, where)
    for name, child in (node.get("properties") or {}).items():
        problems += _node_problems(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        problems += _node_problems(node["additionalProperties"], f"{where}[*]")
    if "items" in node:
        problems += _node_problems(node["items"], f"{where}[]")
    return problems


def _default_problems(node: dict[str, Any], where: str) -> list[str]:
    default = node["default"]
    problems = [] if pruned(node, default) == default else [f"{where}.default: {default!r} has fields the schema prunes"]
    return problems + [f"{where}.default: {violation.removeprefix('<root>: ')}"
                       for violation in schema_violations(node, default)]


def _map_list_problems(node: dict[str, Any], where: str) -> list[str]:
    items, keys = node.get("items") or {}, node.get("x-kubernetes-list-map-keys") or []
    if items.get("type") != "object" or not keys:
        return [f"{where}: a map list needs object items and x-kubernetes-list-map-keys"]
    fields = items.get("properties") or {}
    return [f"{where}: map key {key!r} must be a scalar field every entry has (required or defaulted)"
            for key in keys if key not in fields or fields[key].get("type") not in ("string", "integer", "boolean")
            or (key not in items.get("required", []) and "default" not in fields[key])]


def _as_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
