"""The emulated API's authorization, as a real API server's RBAC authorizer decides it.

Two uses: a verb on a resource that a test takes away from everyone
(EmulatedCluster.deny: an operator upgraded without its chart's new rules), and a user
whose every request is checked against the Roles and ClusterRoles bound to it
(EmulatedCluster.kubeconfig_for: the chart's own RBAC, rendered). The request's
attributes are read from its URL as the API server's RequestInfo resolver reads them.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, NamedTuple

from replace_semantics import failure_status

# /api/v1/... or /apis/<group>/<version>/..., then [namespaces/<ns>/]<resource>[/<name>[/<subresource>]]
RESOURCE_URL = re.compile(r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<namespace>[^/]+))?"
                          r"(?:/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<subresource>[^/]+))?)?)?/?")
# Who is refused by EmulatedCluster.deny: the chart's service account, as the operator runs.
OPERATOR_USER = "system:serviceaccount:dreambooth:dreambooth-operator"


class RequestAttributes(NamedTuple):
    """What RBAC decides on: resource is `<plural>` or `<plural>/<subresource>`."""
    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None

    @property
    def plural(self) -> str:
        return self.resource.split("/")[0]


class Grant(NamedTuple):
    """One rule of a bound role; namespace None: a ClusterRole bound cluster-wide."""
    namespace: str | None
    rule: Mapping[str, Any]


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> RequestAttributes | None:
    """The request's RBAC attributes; None for a non-resource URL (discovery, /version),
    which every authenticated user may read."""
    match = RESOURCE_URL.fullmatch(path)
    if match is None or (match["resource"] is None and match["namespace"] is None):
        return None
    group, namespace, resource, name, subresource = match.group("group", "namespace", "resource", "name", "subresource")
    if resource is None:  # /api/v1/namespaces/<name>: the Namespace object, in its own namespace (a Role there may grant it)
        resource, name = "namespaces", namespace
    if subresource is not None:
        resource = f"{resource}/{subresource}"
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    return RequestAttributes(verb, group or "", resource, namespace, name)


def _covers(values: Iterable[str], value: str) -> bool:
    return "*" in values or value in values


def allows(grants: Iterable[Grant], request: RequestAttributes) -> bool:
    """RBAC's rule match: a Role's rules hold only in its namespace, and a rule with
    resourceNames never matches a request without a name (a create, a list)."""
    for grant in grants:
        if grant.namespace is not None and grant.namespace != request.namespace:
            continue
        rule = grant.rule
        names = rule.get("resourceNames") or []
        if (_covers(rule.get("apiGroups") or [], request.group) and _covers(rule.get("resources") or [], request.resource)
                and _covers(rule.get("verbs") or [], request.verb)
                and (not names or (request.name is not None and request.name in names))):
            return True
    return False


def service_account(namespace: str, name: str) -> dict[str, str]:
    """A binding's subject for the service account `namespace/name`."""
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


def grants_of(objects: Iterable[Mapping[str, Any]], subject: Mapping[str, str]) -> list[Grant]:
    """The rules that RBAC objects (Roles, ClusterRoles and their bindings) give `subject`
    (a binding's subject: service_account(...), or {"kind": "User", "name": ...}). A
    ClusterRole with an aggregationRule has the rules of the ClusterRoles its selectors
    match, as the controller manager's aggregation fills it in."""
    objects = list(objects)
    cluster_roles = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ClusterRole"}
    roles = {(obj["metadata"]["namespace"], obj["metadata"]["name"]): obj.get("rules") or []
             for obj in objects if obj["kind"] == "Role"}
    grants = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        where = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        if not any(_is(bound, subject, where) for bound in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        rules = roles.get((where, ref["name"]), []) if ref["kind"] == "Role" else _rules_of(cluster_roles, ref["name"])
        grants += [Grant(where, rule) for rule in rules]
    return grants


def _is(bound: Mapping[str, str], subject: Mapping[str, str], binding_namespace: str | None) -> bool:
    if bound["kind"] != subject["kind"] or bound["name"] != subject["name"]:
        return False
    return bound["kind"] != "ServiceAccount" or bound.get("namespace", binding_namespace) == subject["namespace"]


def _rules_of(cluster_roles: Mapping[str, Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    role = cluster_roles.get(name)
    if role is None:
        return []
    if "aggregationRule" not in role:
        return role.get("rules") or []
    rules = []
    for selector in role["aggregationRule"]["clusterRoleSelectors"]:
        assert set(selector) == {"matchLabels"}, f"only matchLabels selectors are resolved here: {selector}"
        rules += [rule for other in cluster_roles.values() if other is not role
                  and selector["matchLabels"].items() <= (other["metadata"].get("labels") or {}).items()
                  for rule in other.get("rules") or []]
    return rules


def denial(request: RequestAttributes, user: str) -> dict[str, Any]:
    """The authorizer's 403, worded as a real API server words it."""
    name = f' "{request.name}"' if request.name else ""
    where = f' in the namespace "{request.namespace}"' if request.namespace else ""
    scope = "" if request.namespace else " at the cluster scope"
    return failure_status(403, "Forbidden", f'{request.plural}{name} is forbidden: User "{user}" cannot {request.verb} '
                          f'resource "{request.resource}" in API group "{request.group}"{where or scope}')
