"""The server-side tables an API server renders for `kubectl get` of a custom resource:
the CRD's additionalPrinterColumns, filled in from each object (emulated_cluster.py
serves them when kubectl asks for `as=Table`)."""

from __future__ import annotations

import datetime as dt
from typing import Any


def json_path(obj: dict[str, Any], path: str) -> Any:
    """The simple `.a.b.c` JSONPaths that printer columns use; None where absent."""
    value: Any = obj
    for part in path.strip().lstrip(".").split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def human_age(since: str | None, now: dt.datetime) -> str:
    """kubectl's short duration (`45s`, `3m12s`, `2h5m`, `4d`) of a timestamp's age."""
    if not since:
        return "<unknown>"
    seconds = max(0, int((now - dt.datetime.fromisoformat(since.replace("Z", "+00:00"))).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s" if seconds < 600 else f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m" if seconds < 8 * 3600 else f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def printer_table(columns: list[dict[str, Any]], items: list[dict[str, Any]], now: dt.datetime) -> dict[str, Any]:
    """The server-side table an API server renders for a custom resource: a Name column,
    then the CRD's additionalPrinterColumns (dates as ages, absent values empty)."""
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                    "description": "Name must be unique within a namespace."}]
    definitions += [{"name": col["name"], "type": col.get("type", "string"), "format": col.get("format", ""),
                     "priority": col.get("priority", 0), "description": col.get("description", "")}
                    for col in columns]

    def cell(item: dict[str, Any], column: dict[str, Any]) -> Any:
        value = json_path(item, column["jsonPath"])
        if column.get("type") == "date":
            return human_age(value, now)
        return value

    rows = [{"cells": [item["metadata"]["name"], *(cell(item, col) for col in columns)],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": item["metadata"]}} for item in items]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"},
            "columnDefinitions": definitions, "rows": rows}
