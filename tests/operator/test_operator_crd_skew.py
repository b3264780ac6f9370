"""An operator newer than its installed CRD (`helm upgrade` never updates one) says so:
the fields the API server would drop from every job are named on each job, in the log and
in a gauge, by the real operator against the emulated API holding an older CRD."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterator

import kubernetes
import pytest
import yaml
from dbj_examples import minimal_spec
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, condition, phase_is, wait_for

from dreambooth_operator.constants import STATUS_FIELDS
from dreambooth_operator.crd_skew import fields_the_crd_lacks, kept_by_the_crd, outdated_crd_message

CRD = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml").read_text())


def without(crd: dict[str, Any], *paths: str) -> dict[str, Any]:
    """`crd` whose spec schema lacks the fields at `paths` (e.g. "lora.useDora"), as an
    older release's CRD does."""
    older = copy.deepcopy(crd)
    spec = older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path in paths:
        *sections, name = path.split(".")
        schema = spec
        for section in sections:
            schema = schema["properties"][section]
        del schema["properties"][name]
    return older


def test_the_shipped_crd_lacks_nothing_and_an_older_one_is_told_apart() -> None:
    assert fields_the_crd_lacks(CRD) == []
    assert fields_the_crd_lacks(without(CRD, "lora.useDora", "training.snrGamma")) == [
        "spec.training.snrGamma", "spec.lora.useDora"]
    assert fields_the_crd_lacks(without(CRD, "lora")) == ["spec.lora"]  # a whole section, named once
    unserved = copy.deepcopy(CRD)
    unserved["spec"]["versions"][0]["served"] = False
    assert fields_the_crd_lacks(unserved) == ["spec"]


def leaf_paths(schema: dict[str, Any]) -> list[str]:
    """The dotted path of each field without fields of its own (a list's: its entries')."""
    paths = []
    for name, field in (schema.get("properties") or {}).items():
        nested = leaf_paths(field.get("items", field))
        paths += [f"{name}.{path}" for path in nested] or [name]
    return paths


def test_status_fields_the_operator_decides_from_are_checked_too() -> None:
    """An older CRD without status.nextRestartTime would have the API server drop the
    backoff's next start from every write: restarts would not wait."""
    status = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert sorted(STATUS_FIELDS) == sorted(leaf_paths(status))  # the operator's list is the shipped CRD's
    older = copy.deepcopy(without(CRD, "lora.useDora"))
    del older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "nextRestartTime"]
    missing = fields_the_crd_lacks(older)
    assert missing == ["spec.lora.useDora", "status.nextRestartTime"]
    assert ("which the API server drops from every DreamboothJob (a job asking for a spec field it lacks trains "
            "without it; what the operator records in a status field it lacks (restarts, backoff, progress) is "
            "forgotten at once)") in outdated_crd_message(missing)
    # Nested fields: a section's new field is named, and a missing section once.
    nested = copy.deepcopy(CRD)
    status = nested["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    del status["lastFailure"]["properties"]["exitCode"], status["conditions"]["items"]["properties"]["reason"]
    del status["latestCheckpoint"]
    assert fields_the_crd_lacks(nested) == ["status.conditions.reason", "status.lastFailure.exitCode",
                                            "status.latestCheckpoint"]
    # A status kept whole, whatever it holds, lacks nothing.
    preserved = copy.deepcopy(older)
    preserved["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"] = {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert fields_the_crd_lacks(preserved) == ["spec.lora.useDora"]



def test_a_status_is_written_as_the_installed_crd_keeps_it() -> None:
    status = {"phase": "Running", "nextRestartTime": "2026-11-29T10:00:00Z", "lastFailure": {"pod": "w-0", "exitCode": 1},
              "conditions": [{"type": "Running", "status": "True", "reason": "Started"}, {"type": "Failed"}]}
    missing = ["spec.lora.useDora", "status.nextRestartTime", "status.lastFailure.exitCode", "status.conditions.reason"]
    assert kept_by_the_crd(status, missing) == {
        "phase": "Running", "lastFailure": {"pod": "w-0"},
        "conditions": [{"type": "Running", "status": "True"}, {"type": "Failed"}]}
    assert kept_by_the_crd(status, ["status.lastFailure"]) == {k: v for k, v in status.items() if k != "lastFailure"}
    assert kept_by_the_crd(status, []) == status and "nextRestartTime" in status  # the caller's left as it was


@pytest.fixture(scope="module")
def operator(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator started against a cluster whose CRD is an older release's."""
    emulated.install_crd(without(CRD, "lora.useDora", "validation"))
    process = OperatorProcess(emulated, tmp_path_factory.mktemp("operator"), ["--crd-recheck-seconds", "1"]).start()
    yield process
    process.stop()


def test_each_job_is_told_which_of_its_fields_the_installed_crd_drops(operator: OperatorProcess,
                                                                      cluster: Cluster) -> None:
    cluster.create_job("skewed", minimal_spec(lora={"rank": 4, "useDora": True}))
    # What the warning is about: the API server dropped the field the older CRD lacks.
    lora = cluster.job("skewed")["spec"]["lora"]
    assert lora["rank"] == 4 and "useDora" not in lora
    [event] = wait_for(lambda: [e for e in cluster.events("skewed") if e["reason"] == "OutdatedCRD"],
                       what="the OutdatedCRD Event")
    assert event["type"] == "Warning"
    assert event["message"] == (
        "the installed CustomResourceDefinition dreamboothjobs.dreambooth.io is older than this operator: it lacks "
        "spec.lora.useDora, spec.validation, which the API server drops from every DreamboothJob (a job asking for a "
        "spec field it lacks trains without it); apply the operator's CRD (kubectl apply -f "
        "charts/dreambooth-operator/crds/crd.yaml: helm upgrade does not update CRDs)")
    assert operator.metric("dreambooth_operator_crd_missing_fields") == 2
    wait_for(lambda: cluster.pods("skewed"), what="the worker: the job runs all the same")
    assert "is older than this operator" in operator.log_path.read_text()


def test_a_crd_applied_later_clears_the_warning_without_a_restart(operator: OperatorProcess, cluster: Cluster,
                                                                   emulated: EmulatedCluster) -> None:
    """The fix the warning names (kubectl apply of the operator's CRD) is seen at the next
    check: the gauge, and with it the alert, go back to 0, and new jobs are not warned."""
    cluster.create_job("before-the-fix", minimal_spec())
    wait_for(lambda: [e for e in cluster.events("before-the-fix") if e["reason"] == "OutdatedCRD"],
             what="the OutdatedCRD Event")
    emulated.install_crd(CRD)
    wait_for(lambda: operator.metric("dreambooth_operator_crd_missing_fields") == 0, what="the gauge at 0")
    cluster.create_job("after-the-fix", minimal_spec())
    wait_for(lambda: cluster.pods("after-the-fix"), what="the new job's worker")
    assert not [e for e in cluster.events("after-the-fix") if e["reason"] == "OutdatedCRD"]
    assert "now has every field this operator uses" in operator.log_path.read_text()


def without_rules(schema: Any) -> Any:
    """`schema` without its CEL rules, as a release before them had it."""
    if isinstance(schema, dict):
        return {key: without_rules(value) for key, value in schema.items() if key != "x-kubernetes-validations"}
    return [without_rules(item) for item in schema] if isinstance(schema, list) else schema


def test_a_job_stored_before_a_stricter_crd_can_still_be_fixed_or_deleted(operator: OperatorProcess,
                                                                          cluster: Cluster,
                                                                          emulated: EmulatedCluster) -> None:
    """A job an older CRD admitted and the operator refused (metrics.port 80) is not stuck
    once a CRD with a rule against it is applied: on Kubernetes 1.30+ (the chart's minimum)
    the API server ratchets, so the operator still writes its status and, at deletion,
    removes its finalizer. Only an edit that breaks the rule anew is refused."""
    emulated.install_crd(without_rules(CRD))
    try:
        cluster.create_job("stored-before", minimal_spec(metrics={"port": 80}))
        wait_for(phase_is(cluster, "stored-before", "Failed"), what="the job refused by the operator")
    finally:
        emulated.install_crd(CRD)
    assert condition(cluster.status("stored-before"), "Failed")["reason"] == "InvalidSpec"
    with pytest.raises(kubernetes.client.ApiException) as refused:
        cluster.patch_spec("stored-before", {"metrics": {"port": 29500}})
    assert refused.value.status == 422 and "spec.metrics.port" in refused.value.body
    cluster.delete_job("stored-before")
    wait_for(lambda: not cluster.job_exists("stored-before"), what="the job gone, its finalizer removed")


def test_status_fields_the_installed_crd_lacks_are_not_written_at_every_pass(operator: OperatorProcess,
                                                                             cluster: Cluster,
                                                                             emulated: EmulatedCluster) -> None:
    """The API server drops a status field its CRD lacks, so a status written with it would
    differ from the stored one at every pass: one patch per pass per job for nothing."""
    older = copy.deepcopy(CRD)
    status = older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    # maxSteps is set at every pass where it is missing (an older job's status).
    del status["maxSteps"], status["conditions"]["items"]["properties"]["reason"]
    emulated.install_crd(older)
    try:
        wait_for(lambda: operator.metric("dreambooth_operator_crd_missing_fields") == 2, what="the older CRD seen")
        cluster.create_job("steady", minimal_spec())
        wait_for(lambda: cluster.pods("steady"), what="the worker")
        cluster.run_pods("steady")
        wait_for(phase_is(cluster, "steady", "Running"), what="the job Running")

        def writes_over(seconds: float) -> int:
            before = emulated.status_writes("dreamboothjobs", "default", "steady")
            time.sleep(seconds)
            return emulated.status_writes("dreamboothjobs", "default", "steady") - before

        # The passes the pod's start woke are over once a resync (--resync-seconds 2) writes nothing...
        wait_for(lambda: writes_over(2.5) == 0, what="a resync without a status write")
        assert writes_over(5.0) == 0  # ...and neither do the next two
        assert "maxSteps" not in cluster.status("steady")  # what the server keeps, still written
        assert cluster.status("steady")["phase"] == "Running"
    finally:
        emulated.install_crd(CRD)


def test_an_older_enum_is_told_apart_by_the_values_it_refuses() -> None:
    """An enum the model grew (lrScheduler's cosine_with_restarts, polynomial): the older
    CRD has the field, but the API server refuses a job asking for a newer value."""
    older = copy.deepcopy(CRD)
    spec = older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec["training"]["properties"]["lrScheduler"]["enum"] = ["constant", "linear", "cosine"]
    spec["validation"]["properties"]["scheduler"]["enum"].remove("DDPMScheduler")  # an optional field's too
    missing = fields_the_crd_lacks(older)
    assert missing == ["spec.training.lrScheduler=cosine_with_restarts|polynomial",
                       "spec.validation.scheduler=DDPMScheduler"]
    assert ("it lacks spec.training.lrScheduler=cosine_with_restarts|polynomial, spec.validation.scheduler=DDPMScheduler, "
            "which the API server refuses (a job asking for a value it lacks (field=values) is refused at kubectl "
            "apply); apply the operator's CRD") in outdated_crd_message(missing)
    both = outdated_crd_message(["spec.lora.useDora", *missing])
    assert "which the API server drops from every DreamboothJob or refuses (a job asking for a spec field" in both
