"""The operator's few Kubernetes API calls, on the official client, returning plain dicts.

Create treats 409 (already exists) as done and delete treats 404 (already gone) as
done, so every caller is idempotent. Every call raises Forbidden on a 403, which the
reconciler reports on the job. The client is synchronous; calls run in a small thread
pool so the operator's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import json
from typing import Any, Callable

import kubernetes
import pydantic
from kubernetes.client.rest import ApiException

from .constants import API_VERSION, GROUP, KIND, MANAGER, PLURAL, POD_GROUP_KIND, POD_GROUP_PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
# Enough for many jobs' short calls at once; each call takes milliseconds.
API_THREADS = 16
# (connect, read) seconds. Without them, a call on a connection the API server's fail-over
# or a load balancer left half-open waits forever: that job's loop stops, and 16 such
# calls stop every job's. urllib3 retries a timed-out GET 3 times: 160 s at most.
REQUEST_TIMEOUT = (10, 30)


def load_client_config(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig is not None:
            raise kubernetes.config.ConfigException("explicit kubeconfig")
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def connection_info(configuration: kubernetes.client.Configuration) -> Any:
    """The same credentials, in the form kopf's own API client takes."""
    import kopf

    header = (configuration.get_api_key_with_prefix("BearerToken")
              or configuration.get_api_key_with_prefix("authorization") or "")
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class KubeApi:
    def __init__(self, configuration: kubernetes.client.Configuration,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self._request_timeout = request_timeout
        self._client = kubernetes.client.ApiClient(configuration)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._networking = kubernetes.client.NetworkingV1Api(self._client)
        self._coordination = kubernetes.client.CoordinationV1Api(self._client)
        self._extensions = kubernetes.client.ApiextensionsV1Api(self._client)
        self._pool = concurrent.futures.ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        kwargs.setdefault("_request_timeout", self._request_timeout)
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except ApiException as error:
            if error.status == 403:
                raise Forbidden(api_message(error)) from None
            raise

    @staticmethod
    def _json(response: Any) -> Any:
        return json.loads(response.data) if response.data else None

    # --- children -------------------------------------------------------------------

    _CREATE = {
        "Pod": "create_namespaced_pod",
        "Service": "create_namespaced_service",
        "ConfigMap": "create_namespaced_config_map",
        "PersistentVolumeClaim": "create_namespaced_persistent_volume_claim",
        "NetworkPolicy": "create_namespaced_network_policy",
        "Event": "create_namespaced_event",
    }
    _DELETE = {
        "Pod": "delete_namespaced_pod",
        "Service": "delete_namespaced_service",
        "ConfigMap": "delete_namespaced_config_map",
        "PersistentVolumeClaim": "delete_namespaced_persistent_volume_claim",
        "NetworkPolicy": "delete_namespaced_network_policy",
    }
    # Read by name: the photos' ConfigMap, the claims the workers mount.
    _READ = {
        "Event": "read_namespaced_event",
        "Service": "read_namespaced_service",
        "ConfigMap": "read_namespaced_config_map",
        "PersistentVolumeClaim": "read_namespaced_persistent_volume_claim",
        "NetworkPolicy": "read_namespaced_network_policy",
    }
    # Merge-patched: the spec of a child of the job's own that the builder now makes otherwise.
    _PATCH = {
        "Service": "patch_namespaced_service",
        "NetworkPolicy": "patch_namespaced_network_policy",
    }
    _LIST = {
        "Pod": "list_namespaced_pod",
        "Service": "list_namespaced_service",
        "ConfigMap": "list_namespaced_config_map",
        "PersistentVolumeClaim": "list_namespaced_persistent_volume_claim",
    }

    # The client of each kind outside the core API group (and not a CRD's: custom_resource).
    _GROUP_CLIENTS = {"NetworkPolicy": "_networking"}

    def _method(self, table: dict[str, str], kind: str) -> Callable[..., Any]:
        return getattr(getattr(self, self._GROUP_CLIENTS.get(kind, "_core")), table[kind])

    @staticmethod
    def custom_resource(obj: dict[str, Any]) -> tuple[str, str, str] | None:
        """(group, version, plural) of a child that a CRD serves (a scheduler's PodGroup);
        None for the core kinds."""
        if obj["kind"] != POD_GROUP_KIND:
            return None
        group, version = obj["apiVersion"].split("/")
        return group, version, POD_GROUP_PLURAL

    async def _post(self, obj: dict[str, Any], **kwargs: Any) -> Any:
        namespace = obj["metadata"]["namespace"]
        custom = self.custom_resource(obj)
        if custom is not None:
            group, version, plural = custom
            return await self._call(self._custom.create_namespaced_custom_object, group, version, namespace, plural,
                                    obj, _preload_content=False, **kwargs)
        return await self._call(self._method(self._CREATE, obj["kind"]), namespace, obj,
                                _preload_content=False, **kwargs)

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False when it already exists (409), which callers treat as done."""
        try:
            await self._post(obj)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def refusal(self, obj: dict[str, Any]) -> str | None:
        """Why `obj` cannot be created, or None: the client's own schema check, then the
        API server's in a dry run (400 or 422: malformed or invalid), which stores nothing;
        for a kind a CRD serves, also its absence (404: the CRD is not installed)."""
        try:
            await self._post(obj, dry_run="All")
        except pydantic.ValidationError as error:
            return schema_message(error)
        except Forbidden:  # for now (a quota, RBAC): the create will say
            return None
        except ApiException as error:
            if error.status in (400, 422):
                return api_message(error)
            custom = self.custom_resource(obj)
            if error.status == 404 and custom is not None:
                group, version, plural = custom
                return f"the cluster serves no {plural}.{group}/{version}: its CRD is not installed"
            if error.status == 409:  # there already: the create will say
                return None
            raise
        return None

    async def replace_config_map(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        await self._patch(self._core.patch_namespaced_config_map, meta["name"], meta["namespace"],
                          {"metadata": {"annotations": meta.get("annotations", {})}, "data": obj["data"]})

    async def _patch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        await self._call(fn, *args, _preload_content=False, **kwargs)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist (404)."""
        return await self._read(self._method(self._READ, kind), name, namespace)

    async def get_live(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The live object of `obj`'s kind, namespace and name, a CRD's kind included (the
        PodGroup of `obj`'s apiVersion); None when it, or the CRD, does not exist (404)."""
        meta = obj["metadata"]
        custom = self.custom_resource(obj)
        if custom is None:
            return await self.get(obj["kind"], meta["namespace"], meta["name"])
        group, version, plural = custom
        return await self._read(self._custom.get_namespaced_custom_object, group, version, meta["namespace"], plural,
                                meta["name"])

    async def _read(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """One read call's object; None when it does not exist (404)."""
        return await self._or_none(404, fn, *args)

    async def _or_none(self, status: int, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """The object a call returns; None when the API server answers `status`."""
        try:
            response = await self._call(fn, *args, _preload_content=False)
        except ApiException as error:
            if error.status == status:
                return None
            raise
        return self._json(response)

    async def _delete(self, fn: Callable[..., Any], *args: Any) -> bool:
        """One delete call; False when the object (or, for a CRD's kind, the CRD) was
        already gone (404)."""
        try:
            await self._call(fn, *args, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with the object's own grace period; False when it was already gone (404)."""
        return await self._delete(self._method(self._DELETE, kind), name, namespace)

    async def resize_claim(self, namespace: str, name: str, size: str) -> None:
        """Ask for more storage in a claim: its only field that may change once bound."""
        await self._patch(self._core.patch_namespaced_persistent_volume_claim, name, namespace,
                          {"spec": {"resources": {"requests": {"storage": size}}}})

    async def replace_spec(self, obj: dict[str, Any]) -> None:
        """Set the spec of an existing child to `obj`'s (a PodGroup whose gang was resized, a
        Service and NetworkPolicy whose metrics port was edited). A merge patch: the keys
        `obj` names are set, a list it names is replaced whole, and the keys the API server
        filled in (a Service's clusterIPs, ipFamilies, ...) are kept."""
        meta = obj["metadata"]
        body = {"spec": obj["spec"]}
        custom = self.custom_resource(obj)
        if custom is not None:
            group, version, plural = custom
            await self._patch(self._custom.patch_namespaced_custom_object, group, version, meta["namespace"], plural,
                              meta["name"], body, _content_type=MERGE_PATCH)
            return
        await self._patch(self._method(self._PATCH, obj["kind"]), meta["name"], meta["namespace"], body,
                          _content_type=MERGE_PATCH)

    async def delete_custom(self, obj: dict[str, Any]) -> bool:
        """Delete a child a CRD serves; False when it (or its CRD) is gone (404)."""
        group, version, plural = self.custom_resource(obj)
        meta = obj["metadata"]
        return await self._delete(self._custom.delete_namespaced_custom_object, group, version, meta["namespace"],
                                  plural, meta["name"])

    async def list(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        method = self._method(self._LIST, kind)
        response = await self._call(method, namespace, label_selector=label_selector, _preload_content=False)
        return list((self._json(response) or {}).get("items") or [])

    # --- the DreamboothJob itself ----------------------------------------------------

    async def get_crd(self, name: str) -> dict[str, Any] | None:
        """The installed CustomResourceDefinition `name`; None when there is none."""
        return await self._read(self._extensions.read_custom_resource_definition, name)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    async def delete_job(self, namespace: str, name: str) -> bool:
        """Delete the DreamboothJob; its finalizer runs the operator's clean-up first.
        False when it was already gone."""
        return await self._delete(self._custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                                  name)

    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            await self._call(self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                             PLURAL, name, {"status": patch}, _content_type=MERGE_PATCH, _preload_content=False)
        except ApiException as error:
            if error.status != 404:  # the job was deleted meanwhile: nothing to report on
                raise

    async def post_event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """One Event per (job, type, reason, message), as client-go's recorder keeps them:
        a repeat bumps its count and lastTimestamp instead of adding an object to etcd."""
        meta = job["metadata"]
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = message[:1024]  # the API server caps Event messages at 1 KiB
        key = "\0".join([meta.get("uid", ""), type_, reason, message]).encode()
        name = f"{meta['name']}.{hashlib.sha256(key).hexdigest()[:16]}"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid", "")},
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        if await self.create(event):
            return
        existing = await self.get("Event", meta["namespace"], name)
        if existing is None:  # expired (the API server keeps Events an hour) between the two calls
            await self.create(event)
            return
        await self._call(self._core.patch_namespaced_event, name, meta["namespace"],
                         {"count": int(existing.get("count") or 1) + 1, "lastTimestamp": now},
                         _content_type=MERGE_PATCH, _preload_content=False)

    # --- the leader election's Lease (leader.py) ---------------------------------------

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Lease, or None when there is none yet (404)."""
        return await self._read(self._coordination.read_namespaced_lease, name, namespace)

    async def create_lease(self, lease: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease; None when another candidate created it first (409)."""
        return await self._or_none(409, self._coordination.create_namespaced_lease, lease["metadata"]["namespace"],
                                   lease)

    async def replace_lease(self, lease: dict[str, Any]) -> dict[str, Any] | None:
        """Replace the Lease if its resourceVersion is still `lease`'s (the API server checks):
        the written Lease; None when another candidate wrote it since (409)."""
        meta = lease["metadata"]
        return await self._or_none(409, self._coordination.replace_namespaced_lease, meta["name"],
                                   meta["namespace"], lease)


class Forbidden(Exception):
    """The API server forbids a call for now (403: a quota, an admission policy, RBAC
    the operator lacks, as after an image upgrade without its chart's new rules); the
    message is its own."""


def api_message(error: ApiException) -> str:
    """The `message` of the API server's Status reply, else the HTTP reason."""
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


def schema_message(error: pydantic.ValidationError) -> str:
    """The client's schema errors for a body, as `spec.volumes[4].nfs.path: Field required`
    (its locations start with the body's position among the call's arguments)."""
    problems = []
    for item in error.errors()[:3]:
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"][1:])
        problems.append(f"{path.lstrip('.')}: {item['msg']}")
    return "; ".join(problems)
