"""The emulated API's label selectors: the grammar as tables, and a real client's watch
with a selector over HTTP (objects that come to match or stop matching)."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from typing import Any, Iterator

import kubernetes
import pytest
import urllib3
from emulated_cluster import EmulatedCluster
from label_selectors import matches, parse_selector

pytestmark = pytest.mark.timeout(60)

WORKER = {"dreambooth.io/job": "a", "dreambooth.io/role": "worker"}


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("dreambooth.io/job", WORKER, True),
    ("dreambooth.io/job", {"app": "x"}, False),
    ("!dreambooth.io/job", {"app": "x"}, True),
    ("!dreambooth.io/job", WORKER, False),
    ("dreambooth.io/job=a", WORKER, True),
    ("dreambooth.io/job==a", WORKER, True),
    ("dreambooth.io/job=b", WORKER, False),
    ("dreambooth.io/job=a", {}, False),
    ("dreambooth.io/job!=b", WORKER, True),
    ("dreambooth.io/job!=a", WORKER, False),
    ("dreambooth.io/job!=a", {}, True),  # != also selects objects without the label
    ("dreambooth.io/job=a,dreambooth.io/role=worker", WORKER, True),
    ("dreambooth.io/job=a, dreambooth.io/role=launcher", WORKER, False),
    ("dreambooth.io/job in (b, a)", WORKER, True),
    ("dreambooth.io/job in (b,c),dreambooth.io/role", WORKER, False),
    ("dreambooth.io/job notin (b,c),dreambooth.io/role", WORKER, True),
    ("dreambooth.io/job notin (a)", WORKER, False),
    ("team notin (vision)", WORKER, True),
    ("", {}, True),
])
def test_selector_semantics_are_the_api_servers(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert matches(parse_selector(selector), labels) is expected


@pytest.mark.parametrize("selector", ["job=a=b", "job in a,b", "=a", "job=a,", "job in (a b)", "job>1"])
def test_a_malformed_selector_is_refused_naming_it(selector: str) -> None:
    with pytest.raises(ValueError, match="labelSelector|values") as error:
        parse_selector(selector)
    assert "expected key" in str(error.value) or "label value" in str(error.value)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kubernetes.client.CoreV1Api]:
    emulated = EmulatedCluster(tmp_path_factory.mktemp("selectors")).start()
    yield kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(emulated.kubeconfig)))
    emulated.stop()


def pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}


def test_list_and_watch_serve_only_matching_pods(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("worker", WORKER))
    core.create_namespaced_pod("default", pod("bystander", {"app": "web"}))
    listed = json.loads(core.list_namespaced_pod("default", label_selector="dreambooth.io/job",
                                                 _preload_content=False).data)["items"]
    assert [p["metadata"]["name"] for p in listed] == ["worker"]

    events: queue.Queue[tuple[str, str]] = queue.Queue()
    watch = kubernetes.watch.Watch()

    def stream() -> None:
        # watch.stop() shuts the socket down under the read, which then ends in ProtocolError.
        with contextlib.suppress(urllib3.exceptions.ProtocolError):
            for event in watch.stream(core.list_namespaced_pod, "default", label_selector="dreambooth.io/job",
                                      timeout_seconds=30):
                events.put((event["type"], event["object"].metadata.name))

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert events.get(timeout=10) == ("ADDED", "worker")
    try:
        # The bystander changes first: had it been streamed, it would come before the worker.
        core.patch_namespaced_pod("bystander", "default", {"metadata": {"annotations": {"x": "1"}}})
        core.patch_namespaced_pod("worker", "default", {"metadata": {"annotations": {"x": "1"}}})
        assert events.get(timeout=10) == ("MODIFIED", "worker")
        # Gaining the label adds a pod to the stream; losing it removes one.
        core.patch_namespaced_pod("bystander", "default", {"metadata": {"labels": {"dreambooth.io/job": "b"}}})
        assert events.get(timeout=10) == ("ADDED", "bystander")
        core.patch_namespaced_pod("worker", "default", {"metadata": {"labels": {"dreambooth.io/job": None}}})
        assert events.get(timeout=10) == ("DELETED", "worker")
        core.patch_namespaced_pod("worker", "default", {"metadata": {"annotations": {"x": "2"}}})
        core.delete_namespaced_pod("bystander", "default")
        assert events.get(timeout=10) == ("DELETED", "bystander")
        assert events.empty()
    finally:
        watch.stop()
        reader.join(10)


def test_a_malformed_selector_is_a_400_naming_it(core: kubernetes.client.CoreV1Api) -> None:
    with pytest.raises(kubernetes.client.ApiException) as error:
        core.list_namespaced_pod("default", label_selector="dreambooth.io/job in a")
    assert error.value.status == 400
    assert "dreambooth.io/job in a" in json.loads(error.value.body)["message"]
