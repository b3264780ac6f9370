"""Whether the installed CRD knows every spec field this operator reads (and every value
of its enums), and every status field it writes. `helm upgrade` never updates a CRD, and
an API server silently prunes the fields its CRD lacks: a job asking for a newer field
(spec.lora.useDora) would train without it, and nobody would know; an older enum refuses
a newer value with a list that does not say why. So the operator compares the installed
schema with its own spec model when it starts, and again every few minutes
(Reconciler.check_crd), and says what is missing where users look."""

from __future__ import annotations

import logging
from typing import Any, Iterator, Literal, get_args, get_origin

from pydantic import BaseModel

from .constants import GROUP, KIND, PLURAL, STATUS_FIELDS, VERSION
from .spec import JobSpec

CRD_NAME = f"{PLURAL}.{GROUP}"

log = logging.getLogger(__name__)


def fields_the_crd_lacks(crd: dict[str, Any], model: type[BaseModel] = JobSpec) -> list[str]:
    """`spec.<path>` of each field of `model`, then `status.<path>` of each of
    STATUS_FIELDS, that the CRD's served version's schema lacks (the API server would
    drop it from every job), in the CRD's camelCase; a version the CRD does not serve at
    all lacks the whole spec."""
    version = next((v for v in (crd.get("spec") or {}).get("versions") or [] if v.get("name") == VERSION
                    and v.get("served")), None)
    if version is None:
        return ["spec"]
    properties = ((version.get("schema") or {}).get("openAPIV3Schema") or {}).get("properties") or {}
    return [*_missing(model, properties.get("spec") or {}, "spec"), *_missing_status(properties.get("status") or {})]


def _missing(model: type[BaseModel], schema: dict[str, Any], path: str) -> Iterator[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return  # kept whole, whatever it holds
    properties = schema.get("properties") or {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias not in properties:
            yield f"{path}.{alias}"
            continue
        allowed = properties[alias].get("enum")
        refused = [value for value in literal_values(field.annotation) if allowed is not None and value not in allowed]
        if refused:  # an older enum: the API server refuses a job asking for a newer value
            yield f"{path}.{alias}={'|'.join(str(value) for value in refused)}"
        nested = next((arg for arg in getattr(field.annotation, "__args__", (field.annotation,))
                       if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        if nested is not None:  # a section, or a list of them (the schema's `items`)
            child = properties[alias]
            yield from _missing(nested, child.get("items", child), f"{path}.{alias}")


def literal_values(annotation: Any) -> list[Any]:
    """The values a Literal field (or an optional one) takes; none for other types."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) if get_origin(arg) is Literal for value in get_args(arg)]


def _missing_status(schema: dict[str, Any]) -> list[str]:
    """`status.<path>` of the first missing part of each of STATUS_FIELDS: a missing
    section (status.lastFailure) is named once, not each of its fields."""
    missing: list[str] = []
    for field in STATUS_FIELDS:
        node, path = schema, "status"
        for name in field.split("."):
            node = node.get("items", node)  # a list's schema: its entries'
            if node.get("x-kubernetes-preserve-unknown-fields"):
                break  # kept whole, whatever it holds
            path += f".{name}"
            if name not in (node.get("properties") or {}):
                missing += [path] if path not in missing else []
                break
            node = node["properties"][name]
    return missing


def outdated_crd_message(missing: list[str]) -> str:
    effects = []
    fields, values = [path for path in missing if "=" not in path], [path for path in missing if "=" in path]
    if any(path.startswith("spec") for path in fields):
        effects.append("a job asking for a spec field it lacks trains without it")
    if values:
        effects.append("a job asking for a value it lacks (field=values) is refused at kubectl apply")
    if any(path.startswith("status.") for path in fields):
        effects.append("what the operator records in a status field it lacks (restarts, backoff, progress) is "
                       "forgotten at once")
    action = " or ".join(([f"drops from every {KIND}"] if fields else []) + (["refuses"] if values else []))
    return (f"the installed CustomResourceDefinition {CRD_NAME} is older than this operator: it lacks "
            f"{', '.join(missing)}, which the API server {action} ({'; '.join(effects)}); "
            f"apply the operator's CRD (kubectl apply -f charts/dreambooth-operator/crds/crd.yaml: helm upgrade "
            f"does not update CRDs)")


async def check_installed_crd(api: Any, metrics: Any) -> list[str]:
    """Read the installed CRD and compare it: the fields it lacks (logged with the message
    to put on every job, and counted in dreambooth_operator_crd_missing_fields); none when
    it has them all or cannot be read (then the gauge says -1)."""
    try:
        crd = await api.get_crd(CRD_NAME)
    except Exception as error:  # noqa: BLE001  (a check that cannot run must not stop the operator)
        log.warning("cannot read the CustomResourceDefinition %s to check it against this operator: %s", CRD_NAME,
                    error)
        crd = None
    if crd is None:
        metrics.crd_missing_fields.set(-1)
        return []
    missing = fields_the_crd_lacks(crd)
    metrics.crd_missing_fields.set(len(missing))
    if missing:
        log.error("%s", outdated_crd_message(missing))
    return missing


def kept_by_the_crd(status: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    """`status` without the fields the installed CRD lacks (`missing`, as
    fields_the_crd_lacks names them): what the API server would store of it. Writing
    only that spares a job a status patch at every pass that the server would undo."""
    for path in missing:
        if path.startswith("status."):
            status = _without(status, path.removeprefix("status.").split("."))
    return status


def _without(value: Any, path: list[str]) -> Any:
    if isinstance(value, list):  # a list's fields are its entries'
        return [_without(item, path) for item in value]
    if not isinstance(value, dict) or path[0] not in value:
        return value
    if len(path) == 1:
        return {key: item for key, item in value.items() if key != path[0]}
    return {**value, path[0]: _without(value[path[0]], path[1:])}
