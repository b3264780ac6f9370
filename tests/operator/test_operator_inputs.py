"""A job's photos from a ConfigMap and the claims its workers mount: checked before pods
are created, each bad case a clear reason (or a Warning Event) on the job; and a
trainer's input error reaching status.lastFailure."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbj_examples import MINIMAL_SPEC, PHOTOS, REPO, photo_config_map, robot_photos
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, condition, wait_for

from dreambooth_operator import constants as c
from dreambooth_operator.inputs import claim_access_modes, config_map_problem, config_map_size, sharing_check
from dreambooth_operator.lifecycle import decide
from dreambooth_operator.podstates import describe_failure
from dreambooth_operator.settings import Timing
from dreambooth_operator.spec import parse_spec
from dreambooth_operator.trainer_config import render_trainer_config
from trainer.contract import EXIT_CONFIG_ERROR

KEY = "spec.data.instanceImages.configMapName"


def config_map_spec(name: str) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["data"]["instanceImages"] = {"configMapName": name}
    return spec


# --- the check as data -------------------------------------------------------------

def test_the_bundled_photos_fit_a_config_map() -> None:
    config_map = photo_config_map("robot-photos", robot_photos())
    assert config_map_problem(config_map, "robot-photos", "default") is None
    assert config_map_size(config_map) == sum(len(k) + len(v) for k, v in robot_photos().items())


def test_a_missing_config_map_says_how_to_create_it() -> None:
    problem = config_map_problem(None, "dog-photos", "team-a")
    assert problem.startswith(f"{KEY} = 'dog-photos': no ConfigMap 'dog-photos' in namespace 'team-a'")
    assert "kubectl create configmap dog-photos -n team-a --from-file=photos/" in problem


def test_an_oversized_config_map_names_its_size_and_the_alternatives() -> None:
    config_map = photo_config_map("big", {"a.jpg": b"x" * (c.CONFIG_MAP_MAX_BYTES - 10), "b.jpg": b"y" * 100})
    problem = config_map_problem(config_map, "big", "default")
    assert f"{KEY} = 'big': holds {c.CONFIG_MAP_MAX_BYTES + 100 - 10 + 10} bytes" in problem
    assert "data.instanceImages.claimName" in problem and "data.instanceImages.url" in problem


@pytest.mark.parametrize("config_map", [
    {"data": {"notes.txt": "hello"}, "binaryData": {"archive.zip": base64.b64encode(b"PK").decode()}},
    {},
])
def test_a_config_map_without_image_keys_names_what_it_found(config_map: dict[str, Any]) -> None:
    problem = config_map_problem(config_map, "photos", "default")
    assert f"{KEY} = 'photos': no image among its keys" in problem
    assert ("archive.zip, notes.txt" if config_map else "it is empty") in problem
    assert ".jpg" in problem


@pytest.mark.parametrize("modes,nodes,read_only,verdict", [
    (["ReadWriteMany"], 4, False, None),
    (["ReadWriteOnce", "ReadWriteMany"], 4, False, None),  # a volume that offers both
    (["ReadWriteOnce"], 1, False, None),  # one worker: any mode works
    (["ReadWriteOncePod"], 1, False, None),
    (["ReadOnlyMany"], 2, True, None),  # the photos are mounted read-only
    (["ReadOnlyMany"], 2, False, "warning"),  # but checkpoints are written
    (["ReadWriteOnce"], 2, False, "warning"),  # works only while both share a node
    (["ReadWriteOncePod"], 2, False, "problem"),  # never works
    ([], 2, False, None),  # unknown: not guessed
])
def test_claims_that_several_workers_cannot_share(modes, nodes, read_only, verdict) -> None:
    found = sharing_check("spec.storage.claimName", "ckpt", modes, nodes, read_only=read_only)
    assert (found and found[0]) == verdict
    if verdict:
        assert found[1].startswith(f"spec.storage.claimName = 'ckpt': the claim is {', '.join(modes)}")
        assert "ReadWriteMany" in found[1]


def test_a_bound_claim_is_judged_by_its_volume() -> None:
    asked = {"spec": {"accessModes": ["ReadWriteOnce"]}}
    assert claim_access_modes(asked) == ["ReadWriteOnce"]
    assert claim_access_modes({**asked, "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}}) == [
        "ReadWriteMany"]


# --- the real operator against the emulated API ----------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    emulated = EmulatedCluster(tmp_path_factory.mktemp("cluster")).start()
    emulated.install_crd()
    operator = OperatorProcess(emulated, tmp_path_factory.mktemp("operator")).start()
    yield Cluster(emulated)
    operator.stop()
    emulated.stop()


def failed_message(cluster: Cluster, job: str) -> str | None:
    failed = condition(cluster.status(job), c.CONDITION_FAILED)
    return failed["message"] if failed and failed["status"] == "True" else None


@pytest.mark.timeout(120)
def test_a_job_waits_failed_for_its_config_map_and_starts_once_it_exists(cluster: Cluster) -> None:
    cluster.create_job("robot", config_map_spec("robot-photos"))
    message = wait_for(lambda: failed_message(cluster, "robot"), what="Failed condition")
    assert "no ConfigMap 'robot-photos' in namespace 'default'" in message
    assert cluster.status("robot")["phase"] == c.PHASE_FAILED
    assert cluster.pods("robot") == []

    cluster.core.create_namespaced_config_map("default", photo_config_map("robot-photos", robot_photos()))
    pods = wait_for(lambda: cluster.pods("robot"), what="worker pod once the ConfigMap exists")
    volumes = {volume["name"]: volume for volume in pods[0]["spec"]["volumes"]}
    assert volumes["instance-images"]["configMap"] == {"name": "robot-photos"}
    assert failed_message(cluster, "robot") is None


@pytest.mark.timeout(120)
def test_a_job_whose_config_map_holds_no_photos_fails_with_a_reason(cluster: Cluster) -> None:
    cluster.core.create_namespaced_config_map("default", photo_config_map("notes", {"readme.txt": b"photos?"}))
    cluster.create_job("notes", config_map_spec("notes"))
    message = wait_for(lambda: failed_message(cluster, "notes"), what="Failed condition")
    assert "'notes': no image among its keys (readme.txt)" in message
    assert condition(cluster.status("notes"), c.CONDITION_FAILED)["reason"] == c.REASON_INVALID_SPEC
    assert cluster.pods("notes") == []


def claim(name: str, modes: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default"},
            "spec": {"accessModes": modes, "resources": {"requests": {"storage": "10Gi"}}}}


def two_workers_on(claim_name: str) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["workers"]["nodes"] = 2
    spec["storage"] = {"claimName": claim_name}
    return spec


@pytest.mark.timeout(120)
def test_two_workers_on_a_read_write_once_claim_start_with_a_warning(cluster: Cluster) -> None:
    cluster.core.create_namespaced_persistent_volume_claim("default", claim("block-disk", ["ReadWriteOnce"]))
    cluster.create_job("on-one-disk", two_workers_on("block-disk"))
    wait_for(lambda: len(cluster.pods("on-one-disk")) == 2, what="both workers created anyway")
    [warning] = wait_for(lambda: [e for e in cluster.events("on-one-disk") if e["reason"] == "VolumeNotShared"],
                         what="a VolumeNotShared Event")
    assert warning["type"] == "Warning"
    assert warning["message"].startswith("spec.storage.claimName = 'block-disk': the claim is ReadWriteOnce")


@pytest.mark.timeout(120)
def test_a_claim_that_does_not_exist_yet_is_named_in_a_warning_once_and_the_worker_waits_for_it(cluster: Cluster) -> None:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["storage"] = {"claimName": "made-later"}
    cluster.create_job("early", spec)
    wait_for(lambda: len(cluster.pods("early")) == 1, what="the worker created anyway")
    warnings = wait_for(lambda: [e for e in cluster.events("early") if e["reason"] == c.REASON_CLAIM_NOT_FOUND],
                        what="ClaimNotFound Events")
    messages = sorted(event["message"] for event in warnings)
    assert messages[1].startswith("spec.storage.claimName = 'made-later': no PersistentVolumeClaim 'made-later' "
                                  "in namespace 'default' yet; the workers wait in Pending until it exists")
    assert messages[0].startswith("spec.data.instanceImages.claimName = 'dog-photos': no PersistentVolumeClaim")
    # Two more resyncs: the warnings were for the gang's start, not for every pass; not a failure.
    time.sleep(5)
    assert len([e for e in cluster.events("early") if e["reason"] == c.REASON_CLAIM_NOT_FOUND]) == 2
    assert cluster.status("early")["phase"] != c.PHASE_FAILED


@pytest.mark.timeout(120)
def test_warnings_repeated_while_a_quota_blocks_the_gang_are_one_event_counted(cluster: Cluster) -> None:
    # No pod can be created, so every pass is a gang start that warns again: each warning
    # stays one Event whose count grows, as client-go's recorder keeps them.
    namespace = "team-c"
    cluster.core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-pods"},
                                                              "spec": {"hard": {"pods": "0"}}})
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["storage"] = {"claimName": "made-later"}
    cluster.create_job("blocked", spec, namespace=namespace)
    counted = wait_for(lambda: [e for e in cluster.events("blocked", namespace)
                                if e["reason"] == c.REASON_CLAIM_NOT_FOUND and e["count"] >= 3],
                       what="a ClaimNotFound Event counted 3 times")
    assert counted[0]["lastTimestamp"] >= counted[0]["firstTimestamp"]
    events = cluster.events("blocked", namespace)
    assert sorted(e["reason"] for e in events) == [c.REASON_CLAIM_NOT_FOUND, c.REASON_CLAIM_NOT_FOUND,
                                                   c.REASON_FAILED_CREATE]


@pytest.mark.timeout(120)
def test_two_workers_on_a_read_write_once_pod_claim_fail_with_the_reason(cluster: Cluster) -> None:
    cluster.core.create_namespaced_persistent_volume_claim("default", claim("one-pod-disk", ["ReadWriteOncePod"]))
    cluster.create_job("on-one-pod-disk", two_workers_on("one-pod-disk"))
    message = wait_for(lambda: failed_message(cluster, "on-one-pod-disk"), what="Failed condition")
    assert message.startswith("spec.storage.claimName = 'one-pod-disk': the claim is ReadWriteOncePod, which only "
                              "one pod may use")
    assert cluster.pods("on-one-pod-disk") == []
    # The same mode asked of a claim the operator makes.
    made = two_workers_on("unused") | {"storage": {"size": "10Gi", "accessMode": "ReadWriteOncePod"}}
    cluster.create_job("makes-one-pod-disk", made)
    message = wait_for(lambda: failed_message(cluster, "makes-one-pod-disk"), what="Failed condition")
    assert message.startswith("spec.storage.accessMode = 'ReadWriteOncePod': the claim is ReadWriteOncePod")
    assert cluster.pods("makes-one-pod-disk") == [] and cluster.claims("makes-one-pod-disk") == []


# --- a trainer's input error, through the pod's termination message -----------------

def test_a_trainer_input_error_reaches_the_jobs_last_failure(tmp_path: Path) -> None:
    """The trainer the operator configures, offline with a hub model: its last log lines
    are what FallbackToLogsOnError puts into the termination message."""
    spec = parse_spec({**MINIMAL_SPEC, "model": {"source": "example-org/no-such-model", "revision": "v1"}})
    config = render_trainer_config("dog", spec)
    config["model"]["cache_dir"] = str(tmp_path / "models")  # the pod's /mnt/storage/models
    config["data"]["instance_dir"] = str(PHOTOS)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CONFIG_ERROR
    log_tail = (result.stdout + result.stderr)[-2048:]  # what the kubelet keeps of the log
    pod = {"metadata": {"name": "dog-worker-0", "labels": {c.LABEL_WORKER_INDEX: "0", c.LABEL_GANG: "0"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": c.WORKER_CONTAINER, "state": {"terminated": {
               "exitCode": result.returncode, "reason": "Error", "message": log_tail}}}]}}
    assert "model.source = 'example-org/no-such-model' (revision v1)" in describe_failure(pod).message
    plan = decide(spec, {"phase": c.PHASE_RUNNING}, [pod], dt.datetime.now(dt.timezone.utc), Timing())
    assert plan.status["phase"] == c.PHASE_FAILED
    assert "offline" in plan.status["lastFailure"]["message"]
