"""What an API server does, from the stored CRD, with a custom resource on its way in:
fields the schema lacks are pruned, its defaults are applied, then the object is
validated against the schema and its CEL rules (x-kubernetes-validations), and refused
with 422 when it breaks one. An update is validated with ratcheting (Kubernetes 1.30+, the
chart's minimum): what it leaves unchanged is not refused, so an object stored before a
stricter CRD can still be written (its status, its finalizers) and deleted. With the status
subresource, a write to the resource leaves its status as it was and a write to /status
leaves the rest. The emulated API (emulated_cluster.py) admits every custom resource whose
CRD it stores through `admit`.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from functools import cache
from typing import Any

import celpy
import jsonpatch
import jsonschema

# Kept on every object whatever the schema says (the API server's own fields).
OBJECT_FIELDS = ("apiVersion", "kind", "metadata")
# The old value of a new one that has none to compare with (a create, a new field, a list's entry).
UNCORRELATED = object()
# The formats the API server checks that our CRD uses.
FORMATS = jsonschema.FormatChecker(formats=())
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


@FORMATS.checks("date-time", raises=ValueError)
def is_date_time(value: object) -> bool:
    """RFC 3339, as metav1.Time writes it (2026-11-29T09:00:00Z); not a bare date or a local time."""
    if not isinstance(value, str):
        return True  # the type check speaks for other kinds
    if not RFC3339.fullmatch(value):
        return False
    dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # a ValueError for a 30th of February
    return True


def served_schema(crd: dict[str, Any], version: str) -> dict[str, Any] | None:
    """The openAPIV3Schema of `version`, when the CRD serves it."""
    for served in crd.get("spec", {}).get("versions") or []:
        if served.get("name") == version and served.get("served"):
            return (served.get("schema") or {}).get("openAPIV3Schema")
    return None


def has_status_subresource(crd: dict[str, Any], version: str) -> bool:
    return any(v.get("name") == version and "status" in (v.get("subresources") or {})
               for v in crd.get("spec", {}).get("versions") or [])


def pruned(schema: dict[str, Any], value: Any) -> Any:
    """`value` without the fields `schema` does not know (the API server drops them silently)
    and without the nulls it does not allow."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return value
    if isinstance(value, dict) and "properties" in schema:
        # A null where the schema does not say `nullable` is dropped too, before defaulting.
        return {key: pruned(schema["properties"][key], item) for key, item in value.items()
                if key in schema["properties"] and (item is not None or schema["properties"][key].get("nullable"))}
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {key: pruned(schema["additionalProperties"], item) for key, item in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [pruned(schema["items"], item) for item in value]
    return value


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults for the fields it lacks, at every level it has
    (and inside each default applied)."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, child in schema["properties"].items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = defaulted(child, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [defaulted(schema["items"], item) for item in value]
    return value


@cache
def cel_program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def rule_violations(schema: dict[str, Any], value: Any, path: str = "", old: Any = UNCORRELATED) -> list[str]:
    """`path: message` of each x-kubernetes-validations rule that `value` breaks, each rule
    evaluated by a CEL interpreter on the value at its own level. Ratcheting: a level equal
    to `old`, its value before an update, is not evaluated, nor anything under it."""
    if value == old:
        return []
    broken = [f"{path or '<root>'}: {rule['message']}" for rule in schema.get("x-kubernetes-validations", [])
              if not cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})]
    if isinstance(value, dict):
        for key, item in value.items():
            if key in (schema.get("properties") or {}):
                old_item = old.get(key, UNCORRELATED) if isinstance(old, dict) else UNCORRELATED
                broken += rule_violations(schema["properties"][key], item, f"{path}.{key}" if path else key, old_item)
    elif isinstance(value, list) and "items" in schema:
        broken += [v for i, item in enumerate(value) for v in rule_violations(schema["items"], item, f"{path}[{i}]")]
    return broken


def schema_violations(schema: dict[str, Any], value: Any, old: Any = UNCORRELATED) -> list[str]:
    """`path: Invalid value: ...` of each place `value` breaks the schema's types and limits,
    but those where it equals `old`, its value before an update (ratcheting)."""
    errors = sorted(jsonschema.Draft4Validator(schema, format_checker=FORMATS).iter_errors(value),
                    key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: Invalid value: "
            f"{error.instance!r}: {error.message}" for error in errors
            if not unchanged_at(list(error.absolute_path), value, old)]


def unchanged_at(path: list[str | int], value: Any, old: Any) -> bool:
    """Whether `value` and `old` agree at `path`. Fields correlate by name; a list's entries
    do not (our CRD's lists are atomic, or map lists only in the status), so a path into a
    list compares the whole list."""
    for part in path:
        if isinstance(value, list) or not isinstance(old, dict) or part not in old:
            break
        value, old = value[part], old[part]
    return value == old


def admit(crd: dict[str, Any], version: str, old: dict[str, Any] | None, new: dict[str, Any],
          subresource: str | None) -> tuple[dict[str, Any], list[str]]:
    """(the object as it would be stored, the reasons to refuse it: none to store it)."""
    schema = served_schema(crd, version) or {}
    if has_status_subresource(crd, version):
        # Each writer its own part: the resource all but the status, /status the status only.
        rest_from, status_from = (old or {}, new) if subresource == "status" else (new, old or {})
        new = {**{k: v for k, v in rest_from.items() if k != "status"},
               **({"status": status_from["status"]} if "status" in status_from else {})}
    body = {key: value for key, value in new.items() if key in OBJECT_FIELDS}
    content = defaulted(schema, pruned(schema, without_object_fields(new)))
    before = without_object_fields(old) if old is not None else UNCORRELATED
    return body | content, [*schema_violations(schema, content, before), *rule_violations(schema, content, old=before)]


def without_object_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """What the schema validates: all but apiVersion, kind and metadata."""
    return {key: value for key, value in obj.items() if key not in OBJECT_FIELDS}


def patched(target: dict[str, Any], patch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """`target` after a JSON merge patch (a dict) or a JSON patch (a list of operations, as
    kopf removes its finalizers)."""
    return jsonpatch.apply_patch(target, patch) if isinstance(patch, list) else merge_patched(target, patch)


def patch_from(old: dict[str, Any], new: dict[str, Any], like: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """The patch of the kind of `like` that turns `old` into `new` (a JSON patch keeps its
    `test` operations, a resourceVersion's precondition)."""
    if isinstance(like, list):
        return [op for op in like if op.get("op") == "test"] + jsonpatch.make_patch(old, new).patch
    return merge_patch_from(old, new)


def merge_patched(target: Any, patch: Any) -> Any:
    """`target` after the JSON merge patch `patch` (RFC 7386: null removes a key)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patched(result.get(key), value)
    return result


def merge_patch_from(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that turns `old` into `new`."""
    patch: dict[str, Any] = {key: None for key in old.keys() - new.keys()}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            if nested := merge_patch_from(old[key], value):
                patch[key] = nested
        elif old.get(key) != value:
            patch[key] = value
    return patch
