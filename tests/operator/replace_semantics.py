"""The API server's replies that the emulator (emulated_cluster.py) builds itself: error
Statuses, and the outcome of an update (PUT), which kmock does not serve."""

from __future__ import annotations

from typing import Any


def failure_status(code: int, reason: str, message: str = "") -> dict[str, Any]:
    """An API server's error reply (a `Status`), as clients parse it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def replaced(stored: dict[str, Any] | None, body: Any, resource: Any, name: str,
             version: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, reply) of a PUT of `body` over `stored` (None: there is none).

    As on an API server, the body replaces the whole object, but only while its
    resourceVersion is the stored one: a writer that read an older version gets 409
    Conflict and must read again, so of two writers racing from one version exactly one
    wins (the Lease election relies on it). A body without a resourceVersion is an
    unconditional update, which the API server allows for most kinds. The server keeps
    the object's identity (uid, creationTimestamp) and bumps generation on a spec change."""
    what = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    if stored is None:
        return 404, failure_status(404, "NotFound", f'{what} "{name}" not found')
    if not isinstance(body, dict):
        return 400, failure_status(400, "BadRequest", "the body of a PUT must be a JSON object")
    meta = body.setdefault("metadata", {})
    stored_meta = stored.get("metadata") or {}
    asked = meta.get("resourceVersion")
    if asked and asked != stored_meta.get("resourceVersion"):
        message = (f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
                   "please apply your changes to the latest version and try again")
        return 409, failure_status(409, "Conflict", message)
    for field in ("uid", "creationTimestamp", "namespace", "generation"):
        if field in stored_meta:
            meta[field] = stored_meta[field]
    if body.get("spec") != stored.get("spec"):
        meta["generation"] = int(stored_meta.get("generation") or 1) + 1
    meta["resourceVersion"] = version
    return 200, body
