"""The pure builders of a job's children but its workers, tested as data: ConfigMap,
Service, NetworkPolicy, claim, their names and owner, the job's output in status, and
the Event the operator posts. Every object the operator creates must pass
kubernetes-validate --strict for the Kubernetes version the project targets."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from dbj_examples import FULL_SPEC, MINIMAL_SPEC, job, job_body, minimal_spec_with, validate_for_supported_kubernetes

from dreambooth_operator import constants as c
from dreambooth_operator.children import (
    claim_resize,
    build_claim,
    build_config_map,
    build_network_policy,
    build_service,
    output_status,
)
from dreambooth_operator.kube import KubeApi
from dreambooth_operator.metadata import named_children, owner_reference
from dreambooth_operator.pods import build_worker_pods
from dreambooth_operator.spec import Job
from dreambooth_operator.trainer_config import render_trainer_config


SPECS = {"minimal": MINIMAL_SPEC, "full": FULL_SPEC}


def all_children(the_job: Job) -> list[dict[str, Any]]:
    config_map = build_config_map(the_job)
    digest = config_map["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
    objects = [config_map, build_service(the_job), build_network_policy(the_job),
               *build_worker_pods(the_job, gang=0, config_hash=digest)]
    claim = build_claim(the_job)
    return objects + ([claim] if claim is not None else [])


@pytest.mark.parametrize("spec_name", SPECS)
def test_every_child_is_a_valid_kubernetes_object(spec_name: str) -> None:
    children = all_children(job(SPECS[spec_name]))
    assert children
    for obj in children:
        validate_for_supported_kubernetes(obj)


def test_the_event_the_operator_posts_is_valid() -> None:
    captured: list[dict[str, Any]] = []

    class Capture(KubeApi):
        def __init__(self) -> None:  # no client: only the body the real post_event builds is kept
            pass

        async def create(self, obj: dict[str, Any]) -> bool:
            captured.append(obj)
            return True

    import asyncio
    asyncio.run(Capture().post_event(job_body(), "Warning", c.REASON_INVALID_SPEC, "spec.workers.nodes = 0: ..."))
    validate_for_supported_kubernetes(captured[0])
    assert captured[0]["involvedObject"]["kind"] == c.KIND


def test_config_map_holds_the_rendered_yaml() -> None:
    the_job = job(FULL_SPEC)
    config_map = build_config_map(the_job)
    assert config_map["metadata"]["name"] == "sks-dog-config"
    assert yaml.safe_load(config_map["data"][c.CONFIG_FILE_NAME]) == render_trainer_config("sks-dog", the_job.spec)


def test_headless_service_gives_workers_stable_names() -> None:
    service = build_service(job(FULL_SPEC))
    assert service["metadata"]["name"] == "sks-dog"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"][c.LABEL_JOB] == "sks-dog"
    assert {p["port"] for p in service["spec"]["ports"]} == {c.RENDEZVOUS_PORT, 9090}


def test_network_policy_admits_the_jobs_own_workers_and_metrics_scrapes_only() -> None:
    policy = build_network_policy(job(FULL_SPEC))
    workers = {"matchLabels": {"dreambooth.io/job": "sks-dog", "dreambooth.io/role": "worker"}}
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["name"] == "sks-dog"
    assert policy["spec"] == {
        "podSelector": workers,
        "policyTypes": ["Ingress"],  # egress open: model downloads, object-store uploads
        "ingress": [
            {"from": [{"podSelector": workers}]},  # peers of its own namespace, any port
            {"ports": [{"port": 9090, "protocol": "TCP"}]},  # no `from`: the operator's and Prometheus' scrapes
        ],
    }


def test_network_policy_without_metrics_admits_only_the_jobs_own_workers() -> None:
    no_metrics = copy.deepcopy(MINIMAL_SPEC)
    no_metrics["metrics"] = {"port": 0}
    policy = build_network_policy(job(no_metrics))
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": policy["spec"]["podSelector"]}]}]


def test_network_policy_selects_every_worker_of_its_job_and_no_other_jobs() -> None:
    selector = build_network_policy(job(FULL_SPEC))["spec"]["podSelector"]["matchLabels"].items()
    for gang in (0, 3):
        for pod in build_worker_pods(job(FULL_SPEC), gang=gang, config_hash="h"):
            assert selector <= pod["metadata"]["labels"].items(), pod["metadata"]["name"]
    for pod in build_worker_pods(job(FULL_SPEC, name="sks-dog-2"), gang=0, config_hash="h"):
        assert not selector <= pod["metadata"]["labels"].items()


def test_the_policy_is_among_the_children_named_after_the_job_only_when_the_operator_makes_it() -> None:
    the_job = job(FULL_SPEC)
    on = {kind: name for kind, name, _ in named_children("sks-dog", network_policy=True)}
    assert on == {"Service": build_service(the_job)["metadata"]["name"],
                  "ConfigMap": build_config_map(the_job)["metadata"]["name"],
                  "NetworkPolicy": build_network_policy(the_job)["metadata"]["name"]}
    assert "NetworkPolicy" not in {kind for kind, _, _ in named_children("sks-dog", network_policy=False)}


def test_status_output_names_the_claim_folder_the_trainer_writes_and_the_upload() -> None:
    created = job(FULL_SPEC)  # storage.size: a claim of the job's own
    rendered = render_trainer_config(created.name, created.spec)
    assert output_status(created) == {"claimName": "sks-dog-storage", "path": "sks-dog/output"}
    assert rendered["output"]["dir"] == f"{c.STORAGE_MOUNT_DIR}/sks-dog/output"
    uploaded = job(minimal_spec_with("output", {"uri": "s3://models/sks-dog"}))
    assert output_status(uploaded) == {"claimName": "dreambooth-ckpt", "path": "sks-dog/output",
                                       "uri": "s3://models/sks-dog"}
    with_adapters = job(minimal_spec_with("lora", {"rank": 8}))
    assert output_status(with_adapters)["loraWeights"] == "sks-dog/output/pytorch_lora_weights.safetensors"


def test_children_are_owned_by_the_job_except_a_retained_claim() -> None:
    the_job = job(FULL_SPEC)
    reference = owner_reference(the_job)
    assert reference == {"apiVersion": "dreambooth.io/v1alpha1", "kind": "DreamboothJob", "name": "sks-dog",
                         "uid": "uid-sks-dog", "controller": True, "blockOwnerDeletion": True}
    for obj in all_children(the_job):
        assert obj["metadata"]["ownerReferences"] == [reference]
        assert obj["metadata"]["labels"][c.LABEL_JOB] == "sks-dog"
    retained = copy.deepcopy(FULL_SPEC)
    retained["storage"]["retain"] = True
    assert "ownerReferences" not in build_claim(job(retained))["metadata"]


def test_created_claim_asks_for_size_class_and_access_mode() -> None:
    claim = build_claim(job(FULL_SPEC))
    assert claim["metadata"]["name"] == "sks-dog-storage"
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                             "storageClassName": "fast-rwx"}


@pytest.mark.parametrize("wanted, held, grow_to, warned", [
    ("2Gi", "1Gi", "2Gi", False),
    ("2048Mi", "2Gi", None, False),  # the same quantity, written otherwise: nothing to do
    ("1Gi", "2Gi", None, True),      # a claim never shrinks
    ("1.5Ti", "1000Gi", "1.5Ti", False),
])
def test_a_created_claim_grows_to_the_spec_and_a_smaller_size_is_a_warning(wanted: str, held: str, grow_to: str | None,
                                                                             warned: bool) -> None:
    spec = {**MINIMAL_SPEC, "storage": {"size": wanted}}
    live = {"metadata": {"name": "sks-dog-storage"}, "spec": {"resources": {"requests": {"storage": held}}}}
    size, warning = claim_resize(job(spec), live)
    assert size == grow_to and (warning is not None) == warned
