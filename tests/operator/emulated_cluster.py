"""An emulated Kubernetes API for the operator's integration tests, served over HTTP.

kmock's KubernetesEmulator is a real stateful API server in memory. This helper adds
what it lacks and the operator or kubectl rely on (DESIGN.md "Testing without a
cluster"): metadata.uid / resourceVersion / creationTimestamp on create, label-selector
filtering of lists and watches (label_selectors.py: an object whose labels come to match or
stop matching is ADDED to or DELETED from a watch, a malformed selector is a 400),
`kind` on list replies and `v1` (not `/v1`) in core discovery,
ConfigMaps and Secrets sent as protobuf (`kubectl create configmap|secret`),
graceful pod deletion (a bound, running pod gets `deletionTimestamp` and stays until
its kubelet deletes it with grace 0) and server-side tables for custom resources
(`kubectl get` columns from the stored CRD's additionalPrinterColumns, printer_tables.py),
server-side dry runs of creation (answered, never stored; Pods and PersistentVolumeClaims checked),
one of the API server's semantic Pod checks (see semantic_refusal), a ResourceQuota's
`pods` count, the fields an API server fills into a Service (server_defaults.py) and
replace (PUT) with optimistic concurrency: a body whose resourceVersion is not the stored
one gets 409 Conflict (the operators' Lease election relies on it), custom resources
admitted by their stored CRD as an API server admits them (crd_admission.py: pruning,
defaults, the schema's limits and CEL rules, a 422 kubectl words as a real one; the
status subresource), and RBAC (rbac.py): a
verb taken away from everyone (deny), or a user authorized by the Roles bound to it
(kubeconfig_for, or kubectl --as; the tester's own kubeconfig may do anything).
It never stands in for the operator's own calls: the operator talks to it over HTTP
with the official client, exactly as to a cluster.

There are no controllers: no scheduler, no kubelet, no garbage collector. Tests play
the kubelet by patching pod statuses through the API (tests/e2e/kubelet.py runs the pods).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import itertools
import json
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import jsonpatch
import kmock
import yaml
from aiohttp import web
from kmock import ResourceInfo
from crd_admission import admit, patch_from, patched
from label_selectors import labels_of, matches, parse_selector, selected_event
from printer_tables import printer_table
from protobuf_bodies import UnsupportedBody, decode_object, is_protobuf
from rbac import OPERATOR_USER, Grant, RequestAttributes, allows, denial, request_attributes
from replace_semantics import failure_status, replaced
from server_defaults import default_service

ALL_VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]

# (resource key, kind, namespaced, short names, subresources)
RESOURCES = [
    ("v1/namespaces", "Namespace", False, ["ns"], ["status"]),
    ("v1/pods", "Pod", True, ["po"], ["status"]),
    ("v1/services", "Service", True, ["svc"], ["status"]),
    ("v1/configmaps", "ConfigMap", True, ["cm"], []),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True, ["pvc"], ["status"]),
    ("v1/secrets", "Secret", True, [], []),
    ("v1/resourcequotas", "ResourceQuota", True, ["quota"], ["status"]),
    ("v1/events", "Event", True, ["ev"], []),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True, ["netpol"], []),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, ["crd"], ["status"]),
    ("dreambooth.io/v1alpha1/dreamboothjobs", "DreamboothJob", True, ["dbj"], ["status"]),
    # Volcano's, for gang scheduling; the coscheduling plugin's is not installed here.
    ("scheduling.volcano.sh/v1beta1/podgroups", "PodGroup", True, ["pg"], ["status"]),
    # The operators' leader election (operator/leader.py).
    ("coordination.k8s.io/v1/leases", "Lease", True, [], []),
]


NAMESPACES = ("default", "team-a", "team-b")
# kmock's URL parser reads `/api/v1/namespaces[/<name>]` as a namespace prefix with no
# resource (and fails), so it cannot serve Namespace objects; kopf lists and watches
# them when given --namespace. The emulator answers those URLs itself.
NAMESPACES_URL = re.compile(r"/api/v1/namespaces(?:/([^/]+))?/?")


# Creates the emulator can dry-run (?dryRun=All: checked, answered, not stored).
DRY_RUN_KINDS = {"pods": "Pod", "persistentvolumeclaims": "PersistentVolumeClaim"}
CREATE_URL = re.compile(rf"/api/v1/namespaces/([^/]+)/({'|'.join(DRY_RUN_KINDS)})/?")
# Any other core kind's create (a Service, a ConfigMap): a dry run of it is answered, not stored.
CORE_CREATE_URL = re.compile(r"/api/v1/namespaces/[^/]+/[^/]+/?")
# Namespaced objects of an API group: those of RESOURCES are dry-run as well; those of a CRD
# this cluster lacks get the 404 of an API server that does not know them (kmock itself
# would accept anything).
GROUP_URL = re.compile(r"/apis/([^/]+/[^/]+)/namespaces/[^/]+/([^/]+)(/.*)?")
SERVED = {key for key, *_ in RESOURCES}
NOT_INSTALLED = {"scheduling.x-k8s.io/v1alpha1/podgroups"}  # the coscheduling plugin's PodGroup


def semantic_refusal(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The 422 Status of an API server for a rule of its validation code that no schema
    states (the client checks the schema before sending), else None. One rule, one that
    a user's workers.env can break: an env var with both a value and a valueFrom."""
    name = (obj.get("metadata") or {}).get("name")
    for c_index, container in enumerate((obj.get("spec") or {}).get("containers") or []):
        for e_index, var in enumerate(container.get("env") or []):
            if var.get("value") and var.get("valueFrom"):
                message = (f'{kind} "{name}" is invalid: spec.containers[{c_index}].env[{e_index}].valueFrom: '
                           'Invalid value: "": may not be specified when `value` is not empty')
                return failure_status(422, "Invalid", message)
    return None


class Served(NamedTuple):
    """One object a list or watch reply carried (`event`: the watch event's type)."""
    action: str
    plural: str
    label_selector: str | None
    event: str | None
    namespace: str | None
    name: str


class Emulator(kmock.KubernetesEmulator):
    _counter = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # What lists and watches served, for tests that assert what a client was shown; None: not kept.
        self.served: list[Served] | None = None
        # (verb, plural) that RBAC denies, as a Role lacking that verb would: see EmulatedCluster.deny.
        self.denied: set[tuple[str, str]] = set()
        # Bearer token -> (user, what RBAC grants it): see EmulatedCluster.kubeconfig_for. Any other
        # token is the tester's, allowed everything.
        self.accounts: dict[str, Account] = {}
        # (user, request) of each 403 the authorizer gave.
        self.refused: list[tuple[str, RequestAttributes]] = []
        # (plural, namespace, name) -> writes to its status subresource (the request log is not kept).
        self.status_writes: collections.Counter[tuple[str, str | None, str | None]] = collections.Counter()
        self._in_flight: set[int] = set()
        self._namespaces = {name: {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
                                   "status": {"phase": "Active"}} for name in NAMESPACES}

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        if raw_request.method in ("POST", "PUT") and is_protobuf(raw_request.headers.get("Content-Type", "")):
            try:
                as_json = json.dumps(decode_object(await raw_request.read())).encode()
            except UnsupportedBody as error:
                return web.json_response(failure_status(415, "UnsupportedMediaType", str(error)), status=415)
            # kmock parses the body it reads back from the request: hand it the JSON form.
            raw_request._read_bytes = as_json
        refusal = await self._authorization_refusal(raw_request)
        if refusal is not None:
            return web.json_response(refusal, status=403)
        created = CREATE_URL.fullmatch(raw_request.path) if raw_request.method == "POST" else None
        if created is not None:
            obj = json.loads(await raw_request.read())
            namespace, plural = created.groups()
            refused = semantic_refusal(obj, DRY_RUN_KINDS[plural])
            if refused is None and plural == "pods":
                refused = self._pod_quota_refusal(obj, namespace)
            if refused is not None:
                return web.json_response(refused, status=refused["code"])
            if raw_request.query.get("dryRun") == "All":
                return web.json_response(obj, status=201)
        grouped = GROUP_URL.fullmatch(raw_request.path)
        resource = f"{grouped.group(1)}/{grouped.group(2)}" if grouped is not None else None
        if resource in NOT_INSTALLED:
            return web.json_response(failure_status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        dry_run = raw_request.method == "POST" and raw_request.query.get("dryRun") == "All"
        if dry_run and (resource in SERVED or CORE_CREATE_URL.fullmatch(raw_request.path)):
            return web.json_response(json.loads(await raw_request.read()), status=201)
        match = NAMESPACES_URL.fullmatch(raw_request.path)
        if match is None or raw_request.method != "GET":
            return await super().__call__(raw_request)
        name = match.group(1)
        if name is not None:
            if name not in self._namespaces:
                return web.json_response(failure_status(404, "NotFound"), status=404)
            return web.json_response(self._namespaces[name])
        if raw_request.query.get("watch") in ("true", "1"):
            # Namespaces never change here: an open stream with no events.
            response = web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", 3600)))
            return response
        return web.json_response({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                  "items": list(self._namespaces.values())})

    async def _authorization_refusal(self, raw_request: web.BaseRequest) -> dict[str, Any] | None:
        """RBAC's 403 for a request its user may not make, else None."""
        request = request_attributes(raw_request.method, raw_request.path, raw_request.query)
        if request is None:
            return None
        if (request.verb, request.plural) in self.denied:
            return self._refuse(request, OPERATOR_USER)
        impersonated = raw_request.headers.get("Impersonate-User")
        if impersonated is not None:  # kubectl --as: the tester may impersonate anyone
            account = next((a for a in self.accounts.values() if a.user == impersonated), Account(impersonated, []))
        else:
            account = self.accounts.get(raw_request.headers.get("Authorization", "").removeprefix("Bearer "))
        if account is None:
            return None
        if not allows(account.grants, request):
            return self._refuse(request, account.user)
        if raw_request.method in ("POST", "PUT", "PATCH") and raw_request.can_read_body:
            # The OwnerReferencesPermissionEnforcement admission (on in OpenShift and hardened
            # clusters): who sets blockOwnerDeletion must be allowed to update the owner's finalizers.
            body = json.loads(await raw_request.read() or b"null")
            metadata = body.get("metadata") or {} if isinstance(body, dict) else {}
            for owner in metadata.get("ownerReferences") or []:
                group = owner["apiVersion"].rpartition("/")[0]
                finalizers = RequestAttributes("update", group, f"{PLURALS[group, owner['kind']]}/finalizers",
                                               request.namespace, owner["name"])
                if owner.get("blockOwnerDeletion") and not allows(account.grants, finalizers):
                    return self._refuse(finalizers, account.user)
        return None

    def _refuse(self, request: RequestAttributes, user: str) -> dict[str, Any]:
        self.refused.append((user, request))
        return denial(request, user)

    def _pod_quota_refusal(self, pod: dict[str, Any], namespace: str) -> dict[str, Any] | None:
        """The ResourceQuota admission's 403 for a pod over a quota's `pods` count."""
        live = sum(1 for (resource, ns, _), obj in self._objects.items()
                   if resource == PODS and ns == namespace and not obj.deleted)
        for (resource, ns, name), quota in self._objects.items():
            if resource != RESOURCE_QUOTAS or ns != namespace or quota.deleted:
                continue
            hard = (quota.raw.get("spec") or {}).get("hard") or {}
            limit = hard.get("pods", hard.get("count/pods"))
            if limit is not None and live + 1 > int(limit):
                message = (f'pods "{pod["metadata"]["name"]}" is forbidden: exceeded quota: {name}, '
                           f"requested: pods=1, used: pods={live}, limited: pods={limit}")
                return failure_status(403, "Forbidden", message)
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock logs every request for assertions and scans the whole log to route each
        # new one: quadratic, seconds per request after a few thousand. These tests
        # assert on API state, not on the log, so only requests in flight are kept
        # (kmock appends a request and enters _handle without yielding in between).
        self._in_flight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        if request.subresource == "status" and request.resource is not None \
                and request.method in (kmock.method.PATCH, kmock.method.PUT):
            self.status_writes[request.resource.plural, request.namespace, request.name] += 1
        try:
            return await self._handle_k8s(request)
        finally:
            self._in_flight.discard(id(request))

    async def _handle_k8s(self, request: kmock.Request) -> Any:
        if request.action in (kmock.action.LIST, kmock.action.WATCH):
            try:
                parse_selector(request.params.get("labelSelector") or "")
            except ValueError as error:
                return web.json_response(failure_status(400, "BadRequest", str(error)), status=400)
        refusal = self._json_patch_refusal(request) or self._admission_refusal(request)
        if refusal is not None:
            return web.json_response(refusal, status=refusal["code"])
        if request.method == kmock.method.PUT and request.resource is not None and request.name:
            return await self._replace(request)
        if request.action == kmock.action.DELETE and request.resource == PODS and request.name:
            response = await self._delete_pod(request)
            if response is not None:
                return response
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
                meta.setdefault("namespace", request.namespace) if request.namespace else None
                if request.resource.plural == "pods":
                    request.data.setdefault("status", {"phase": "Pending"})
                if request.resource.plural == "services":
                    default_service(request.data)
            if request.action == kmock.action.UPDATE and request.subresource is None and "spec" in request.data:
                # Like an API server: a spec change (not a status or metadata one) bumps the generation.
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key] if key in self.objects else None
                if current is not None and not current.deleted:
                    meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(self._counter))
        if request.resource is not None and isinstance(request.data, list) and request.action == kmock.action.UPDATE:
            # A JSON patch (kopf's finalizers) is a new version too; one of the spec, a new generation.
            if request.subresource is None and any(op.get("path", "").startswith("/spec") for op in request.data):
                current = self.objects[request.resource, request.namespace, request.name]
                generation = int(current.get("metadata", {}).get("generation") or 1) + 1
                request.data.append({"op": "add", "path": "/metadata/generation", "value": generation})
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(next(self._counter))})
        return await super()._handle(request)

    def _stored(self, resource: Any, namespace: str | None, name: str | None) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        return self._objects[key].raw if key in self._objects and not self._objects[key].deleted else None

    def _json_patch_refusal(self, request: kmock.Request) -> dict[str, Any] | None:
        """The API server's 422 for a JSON patch it cannot apply: an operation's path missing,
        or a `test` failing (kopf's precondition on the resourceVersion when it removes a
        finalizer, which it reads as a conflict and retries at once)."""
        stored = self._stored(request.resource, request.namespace, request.name)
        if request.method != kmock.method.PATCH or not isinstance(request.data, list) or stored is None:
            return None
        try:
            jsonpatch.apply_patch(stored, request.data)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            return failure_status(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                                  f"{error}")
        return None

    def _admission_refusal(self, request: kmock.Request) -> dict[str, Any] | None:
        """A write of a custom resource whose CRD is stored, admitted as an API server
        admits it (crd_admission.py): the request's body becomes the pruned and defaulted
        object (or, for a patch, the patch to it, of its kind); the 422 when it is invalid, else None."""
        writes = request.action in (kmock.action.CREATE, kmock.action.UPDATE) or request.method == kmock.method.PUT
        crd = self._crd_of(request.resource) if writes and isinstance(request.data, (dict, list)) else None
        if crd is None:
            return None
        name = request.name or (request.data.get("metadata") or {}).get("name")
        old = self._stored(request.resource, request.namespace, name)
        patching = request.method == kmock.method.PATCH
        if patching and old is None:
            return None  # kmock's 404
        new = patched(old, request.data) if patching else request.data
        stored, problems = admit(crd, request.resource.version, old, new, request.subresource)
        if problems:
            kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
            refusal = failure_status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: ' + ", ".join(problems))
            # kubectl words its error from these ("The DreamboothJob "x" is invalid: <field>: <why>").
            causes = [dict(zip(("field", "message"), problem.split(": ", 1)), reason="FieldValueInvalid")
                      for problem in problems]
            return refusal | {"details": {"name": name, "group": group, "kind": kind, "causes": causes}}
        body = patch_from(old, stored, request.data) if patching else stored
        if isinstance(body, list):
            request.data[:] = body
        else:
            request.data.clear()
            request.data.update(body)
        return None

    def _crd_of(self, resource: Any) -> dict[str, Any] | None:
        if resource is None or not resource.group:
            return None
        for (kind, _, _), crd in self._objects.items():
            if kind == CRDS and not crd.deleted and crd.raw["spec"]["group"] == resource.group \
                    and crd.raw["spec"]["names"]["plural"] == resource.plural:
                return crd.raw
        return None

    async def _replace(self, request: kmock.Request) -> web.StreamResponse:
        """PUT (kmock serves none): see replace_semantics.replaced."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            stored = self._stored(*key)
            status, reply = replaced(stored, request.data, request.resource, request.name, str(next(self._counter)))
            if status == 200:
                self._objects[key].create(reply)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": reply})
        return web.json_response(reply, status=status)

    async def _delete_pod(self, request: kmock.Request) -> web.StreamResponse | None:
        """A real API server's graceful pod delete: a pod bound to a node and not yet
        finished is only marked (deletionTimestamp, deletionGracePeriodSeconds); its
        kubelet stops the containers and then deletes it with grace 0. None: kmock's
        plain delete (or its 404) is right."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return None
            pod = self._objects[key]
            grace = delete_grace_seconds(request, pod.raw)
            if pod.raw["metadata"].get("deletionTimestamp"):
                if grace != 0:
                    return web.json_response(pod.raw)  # already terminating
                raw = pod.raw
                pod.delete()
                await self._buses[request.resource].put({"type": "DELETED", "object": raw})
                return web.json_response(raw)
            terminal = (pod.raw.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if grace == 0 or terminal or not (pod.raw.get("spec") or {}).get("nodeName"):
                return None
            now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            pod.patch({"metadata": {"deletionTimestamp": now, "deletionGracePeriodSeconds": grace,
                                    "resourceVersion": str(next(self._counter))}})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": pod.raw})
            return web.json_response(pod.raw)

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        result = await super()._serve_fetch(request)
        return self._as_table(request, [result]) or result

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await self._serve_plain_list(request)
        return self._as_table(request, result["items"]) or result

    def _as_table(self, request: kmock.Request, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        """A meta.k8s.io/v1 Table when kubectl asks for one and the resource's CRD is
        stored (built-in kinds keep kubectl's own NAME/AGE fallback)."""
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        if "as=Table" not in accept or request.resource is None:
            return None
        crd = next((obj.raw for (resource, _, _), obj in self._objects.items()
                    if resource == CRDS and not obj.deleted
                    and obj.raw.get("spec", {}).get("group") == request.resource.group
                    and obj.raw.get("spec", {}).get("names", {}).get("plural") == request.resource.plural), None)
        if crd is None:
            return None
        version = next((v for v in crd["spec"].get("versions") or [] if v.get("name") == request.resource.version), {})
        return printer_table(version.get("additionalPrinterColumns") or [], items, dt.datetime.now(dt.timezone.utc))

    async def _serve_plain_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        requirements = parse_selector(request.params.get("labelSelector") or "")
        result["items"] = [item for item in result["items"] if matches(requirements, labels_of(item))]
        for item in result["items"]:
            self._record(request, None, item)
        info = self.resources[request.resource]
        result["kind"] = f"{info.kind}List"
        group = request.resource.group
        result["apiVersion"] = f"{group}/{request.resource.version}" if group else request.resource.version
        result["metadata"] = {"resourceVersion": str(next(self._counter))}
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        requirements = parse_selector(request.params.get("labelSelector") or "")
        visible: dict[tuple[str | None, str], dict[str, Any]] = {}
        async with contextlib.aclosing(super()._serve_watch(request)) as stream:
            async for item in stream:
                if isinstance(item, dict):  # an event (the bytes before them start the stream)
                    item = selected_event(requirements, item, visible)
                    if item is None:
                        continue
                    self._record(request, item["type"], item["object"])
                yield item

    def _record(self, request: kmock.Request, event: str | None, obj: dict[str, Any]) -> None:
        if self.served is not None and request.resource is not None:
            meta = obj.get("metadata") or {}
            self.served.append(Served(request.action.value.lower(), request.resource.plural,
                                      request.params.get("labelSelector"), event, meta.get("namespace"),
                                      meta.get("name")))

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result.get("resources", []):
            if "/" in entry["name"]:  # a subresource: kubectl warns when it has short names too
                entry["shortNames"] = []
        return result


PODS = kmock.resource("", "v1", "pods")
# (API group, kind) -> plural, for the kinds an ownerReference names.
PLURALS = {(key.rpartition("/")[0].rpartition("/")[0], kind): key.rpartition("/")[2] for key, kind, *_ in RESOURCES}


class Account(NamedTuple):
    user: str
    grants: list[Grant]


SHIPPED_CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"
RESOURCE_QUOTAS = kmock.resource("", "v1", "resourcequotas")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")


def delete_grace_seconds(request: kmock.Request, pod: dict[str, Any]) -> int:
    """The grace period a DELETE asks for (DeleteOptions body or query), else the pod's own."""
    options = request.data if isinstance(request.data, dict) else {}
    asked = options.get("gracePeriodSeconds", request.params.get("gracePeriodSeconds"))
    if asked is not None:
        return int(asked)
    return int((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmulatedCluster:
    """The emulator on 127.0.0.1 in a background thread, plus a kubeconfig for it."""

    def __init__(self, workdir: Path, *, record_served: bool = False) -> None:
        self.record_served = record_served
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "kubeconfig.yaml"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="emulated-cluster", daemon=True)
        self._error: BaseException | None = None
        self._emulator: Emulator | None = None

    def start(self) -> "EmulatedCluster":
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester",
                                                          "namespace": "default"}}],
        }))
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"emulated API did not start: {self._error!r}")
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as error:  # reported by start()
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = self._emulator = Emulator()
        emulator.served = [] if self.record_served else None
        for key, kind, namespaced, short, subresources in RESOURCES:
            emulator.resources[key] = ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                                   verbs=ALL_VERBS, shortnames=short, subresources=subresources)
        async with emulator, kmock.Server(emulator, host="127.0.0.1", port=self.port):
            self._ready.set()
            await self._stop.wait()

    def install_crd(self, crd: dict[str, Any] | None = None) -> None:
        """Store the DreamboothJob CRD (default: the shipped one) in place of the stored
        one: from then on its schema admits every job (crd_admission.py), as on a cluster."""
        crd = crd or yaml.safe_load(SHIPPED_CRD.read_text())
        url = f"{self.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        with contextlib.suppress(urllib.error.HTTPError):  # none stored yet
            urllib.request.urlopen(urllib.request.Request(f"{url}/{crd['metadata']['name']}", method="DELETE"))
        created = urllib.request.Request(url, data=json.dumps(crd).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(created).close()

    def served(self) -> list[Served]:
        """What lists and watches have served so far (needs record_served=True)."""
        assert self._emulator is not None and self._emulator.served is not None, "start(), with record_served=True"
        return list(self._emulator.served)

    def deny(self, verb: str, plural: str, denied: bool = True) -> None:
        """Answer every `verb` on `plural` with RBAC's 403 (denied=False: allow it again), as
        an operator upgraded without its chart's new Role rules is answered."""
        assert self._emulator is not None, "start() first"
        change = self._emulator.denied.add if denied else self._emulator.denied.discard
        self._loop.call_soon_threadsafe(change, (verb, plural))

    def kubeconfig_for(self, user: str, grants: list[Grant]) -> Path:
        """A kubeconfig whose requests the API authorizes as `user`, bound to `grants`
        (rbac.grants_of: the Roles and ClusterRoles bound to it), where the tester's own
        kubeconfig may do anything. kubectl sends no token over plain HTTP: it acts as
        `user` with the tester's kubeconfig and `--as user`, as an admin checks a user's
        rights on a cluster."""
        assert self._emulator is not None, "start() first"
        token = f"token-{len(self._emulator.accounts) + 1}"
        self._emulator.accounts[token] = Account(user, grants)  # one store, atomic: in place before the file
        path = self.kubeconfig.with_name(f"kubeconfig-{token}.yaml")
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": user, "user": {"token": token}}]
        config["contexts"][0]["context"]["user"] = user
        path.write_text(yaml.safe_dump(config))
        return path

    def status_writes(self, plural: str, namespace: str, name: str) -> int:
        """How many writes to that object's status subresource came in so far."""
        assert self._emulator is not None, "start() first"
        return self._emulator.status_writes[plural, namespace, name]

    def refused(self) -> list[tuple[str, RequestAttributes]]:
        """(user, request) of every 403 the authorizer gave so far."""
        assert self._emulator is not None, "start() first"
        return list(self._emulator.refused)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def main() -> None:
    """Serve the emulated API until Ctrl-C, e.g. to try the operator and kubectl by hand:

        .venv/bin/python tests/operator/emulated_cluster.py /tmp/emulated
        .venv/bin/python -m dreambooth_operator --kubeconfig /tmp/emulated/kubeconfig.yaml &
        .tools/bin/kubectl --kubeconfig /tmp/emulated/kubeconfig.yaml apply --validate=false \\
            -f manifests/examples/tiny-cpu-job.yaml
    """
    import sys
    import time

    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = EmulatedCluster(workdir).start()
    print(f"emulated Kubernetes API at {cluster.url}; kubeconfig: {cluster.kubeconfig}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()


if __name__ == "__main__":
    main()
