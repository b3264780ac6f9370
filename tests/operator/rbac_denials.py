"""The emulated API's RBAC denials: a verb on a resource that the test takes away
(EmulatedCluster.deny) is answered as a Role without it is answered by a real API server."""

from __future__ import annotations

from typing import Any

import kmock
from replace_semantics import failure_status


def rbac_verb(request: kmock.Request) -> str:
    """The RBAC verb of a request, as the API server's authorizer names it."""
    if request.action is None:  # a PUT, which kmock does not classify
        return "update" if request.method == kmock.method.PUT else str(request.method.value).lower()
    if request.action == kmock.action.UPDATE:
        return "patch" if request.method == kmock.method.PATCH else "update"
    return {kmock.action.FETCH: "get"}.get(request.action, str(request.action.value).lower())


def rbac_denial(request: kmock.Request) -> dict[str, Any]:
    """The authorizer's 403, worded as a real API server words it."""
    plural, group = request.resource.plural, request.resource.group or ""
    name = f' "{request.name}"' if request.name else ""
    where = f' in the namespace "{request.namespace}"' if request.namespace else ""
    return failure_status(403, "Forbidden", f'{plural}{name} is forbidden: User "system:serviceaccount:dreambooth:'
                          f'dreambooth-operator" cannot {rbac_verb(request)} resource "{plural}" in API group '
                          f'"{group}"{where}')
