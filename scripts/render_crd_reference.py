"""Writes docs/dreamboothjob.md, the DreamboothJob API reference, from the CRD's schema
(manifests/crd.yaml: the one source of truth, which `kubectl explain` reads on a cluster).

    python scripts/render_crd_reference.py          # rewrite docs/dreamboothjob.md
    python scripts/render_crd_reference.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.reference_doc import cell, write_or_check  # noqa: E402

CRD = REPO / "manifests" / "crd.yaml"
TARGET = REPO / "docs" / "dreamboothjob.md"


def type_text(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return "object (any fields)"
    if schema.get("type") == "array":
        return f"list of {type_text(schema.get('items') or {})}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return f"map of {type_text(schema['additionalProperties'])}"
    return str(schema.get("type", "any"))


def rule_text(schema: dict[str, Any]) -> str:
    """The schema's own limits, as the API server applies them at `kubectl apply`."""
    rules = []
    if "enum" in schema:
        rules.append("one of " + ", ".join(f"`{value}`" for value in schema["enum"]))
    # OpenAPI v3.0: exclusiveMinimum/exclusiveMaximum are flags on minimum/maximum.
    if "minimum" in schema:
        rules.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {schema['minimum']}")
    if "maximum" in schema:
        rules.append(f"{'<' if schema.get('exclusiveMaximum') else '<='} {schema['maximum']}")
    if "multipleOf" in schema:
        rules.append(f"a multiple of {schema['multipleOf']}")
    if schema.get("minLength") == 1:
        rules.append("not empty")
    elif "minLength" in schema:
        rules.append(f"at least {schema['minLength']} characters")
    if "pattern" in schema:
        rules.append(f"matches `{schema['pattern']}`")
    return "; ".join(rules)


def default_text(schema: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" in schema and schema["default"] not in ({}, []):
        return f"`{yaml.safe_dump(schema['default'], default_flow_style=True).strip().removesuffix('...').strip()}`"
    return ""


def fields(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(dotted path, schema, required) of every field under `schema`, depth first; a
    list's entries under `path[]`."""
    required = set(schema.get("required") or [])
    for name, child in (schema.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        yield child_path, child, name in required
        entries = child.get("items") or {}
        if "properties" in entries:
            yield from fields(entries, f"{child_path}[]")
        elif "properties" in child:
            yield from fields(child, child_path)


def table(schema: dict[str, Any], path: str) -> list[str]:
    lines = ["| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
    for field_path, field, required in fields(schema, path):
        lines.append(f"| `{field_path}` | {type_text(field)} | {default_text(field, required)} | "
                     f"{cell(rule_text(field))} | {cell(field.get('description', ''))} |")
    return lines


def cross_field_rules(schema: dict[str, Any], path: str) -> list[str]:
    own = [f"- `{path}`: {cell(rule['message'])}" for rule in schema.get("x-kubernetes-validations", [])]
    return own + [line for field_path, field, _ in fields(schema, path)
                  for line in [f"- `{field_path}`: {cell(rule['message'])}"
                               for rule in field.get("x-kubernetes-validations", [])]]


def render() -> str:
    crd = yaml.safe_load(CRD.read_text())
    names = crd["spec"]["names"]
    [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
    root = version["schema"]["openAPIV3Schema"]["properties"]
    spec, status = root["spec"], root["status"]
    lines = [
        f"# {names['kind']} reference (`{crd['spec']['group']}/{version['name']}`)",
        "",
        "Generated from `manifests/crd.yaml` by `scripts/render_crd_reference.py`; do not edit by hand.",
        f"On a cluster, `kubectl explain {names['singular']}.spec.<field>` shows the same descriptions.",
        "Fields are camelCase; a field of a list's entries is written `list[].field`.",
        "",
        "## `spec`",
        "",
        cell(spec.get("description", "")),
        "",
    ]
    required = set(spec.get("required") or [])
    for name, section in spec["properties"].items():
        title = f"### `spec.{name}`" + (" (required)" if name in required else "")
        lines += [title, "", cell(section.get("description", "")), ""]
        if "properties" in section:
            lines += [*table(section, f"spec.{name}"), ""]
        else:
            lines += [f"Type: {type_text(section)}.", ""]
    lines += ["## Rules across fields", "",
              "Besides each field's limits, the API server refuses a job that breaks one of these at "
              "`kubectl apply` (CEL rules of the CRD):", "", *cross_field_rules(spec, "spec"), "",
              "## `status`", "", cell(status.get("description", "")), "",
              *table(status, "status"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(write_or_check(TARGET, render(), sys.argv))
