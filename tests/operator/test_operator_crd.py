"""The CRD: valid, documented field by field, and in step with the operator's spec model."""

from __future__ import annotations

import copy
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from crd_admission import admit, cel_program, rule_violations
from dbj_examples import FULL_SPEC, MINIMAL_SPEC, validate_for_supported_kubernetes
from pod_statuses import pod, unscheduled
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from structural_schema import schema_problems

from dreambooth_operator import constants as c
from dreambooth_operator.lifecycle import decide
from dreambooth_operator.children import output_status
from dreambooth_operator.spec import InvalidSpecError, Job, JobSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "manifests" / "crd.yaml"
CHART_CRD_PATH = REPO / "charts" / "dreambooth-operator" / "crds" / "crd.yaml"
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))

CRD = yaml.safe_load(CRD_PATH.read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for name, child in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", child
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields a real API server would prune silently: every one is a bug here."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(schema["properties"][key], item, f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(schema["items"], item, f"{path}[{i}]")]
    return []


def test_chart_ships_the_same_crd() -> None:
    assert CHART_CRD_PATH.read_text() == CRD_PATH.read_text()


def test_crd_is_a_valid_kubernetes_object() -> None:
    validate_for_supported_kubernetes(CRD)



def test_the_crd_schema_is_one_an_api_server_accepts() -> None:
    """Structural, its defaults pruned and valid, its map list keyed by a required field:
    a schema the API server refuses fails `helm install` on every cluster."""
    assert schema_problems(SCHEMA) == []
    broken = copy.deepcopy(SCHEMA)
    spec = broken["properties"]["spec"]["properties"]
    del spec["training"]["properties"]["maxSteps"]["type"]
    spec["checkpoint"]["properties"]["everySteps"]["default"] = 0
    spec["storage"]["default"] = {"claimName": "ckpt", "typo": 1}
    spec["workers"]["properties"]["nodeSelector"]["properties"] = {}
    del broken["properties"]["status"]["properties"]["conditions"]["items"]["required"]
    broken["properties"]["metadata"] = {"type": "object", "properties": {"labels": {"type": "object"}}}
    assert schema_problems(broken) == [
        "spec.training.maxSteps: type must be one of ['array', 'boolean', 'integer', 'number', 'object', 'string'], "
        "not None",
        "spec.workers.nodeSelector: properties and additionalProperties are mutually exclusive",
        "spec.storage.default: {'claimName': 'ckpt', 'typo': 1} has fields the schema prunes",
        "spec.checkpoint.everySteps.default: Invalid value: 0: 0 is less than the minimum of 1",
        "status.conditions: map key 'type' must be a scalar field every entry has (required or defaulted)",
        "metadata: only metadata.name and metadata.generateName may be restricted, not ['labels']",
    ]


def test_crd_names_scope_columns_and_status_subresource() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert spec["group"] == c.GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == c.KIND and spec["names"]["plural"] == c.PLURAL
    assert spec["names"]["shortNames"] == [c.SHORT_NAME]
    assert VERSION["name"] == c.VERSION and VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    columns = [column["name"] for column in VERSION["additionalPrinterColumns"]]
    assert columns == ["Phase", "Step", "Progress", "Loss", "Restarts", "Preemptions", "Nodes", "Shrunk", "Age"]
    # The last three but Age only with -o wide.
    assert [column.get("priority", 0) for column in VERSION["additionalPrinterColumns"]] == [0] * 5 + [1] * 3 + [0]
    assert SCHEMA["properties"]["status"]["properties"]["phase"]["enum"] == list(c.PHASES)


def test_every_field_has_a_description() -> None:
    missing = [path for path, child in walk(SCHEMA) if path != ".metadata" and not child.get("description")]
    assert missing == []


def _model_fields(model: type[BaseModel], schema: dict[str, Any], path: str) -> Iterator[str]:
    """Differences between a pydantic spec model and its CRD schema, as messages."""
    properties = schema.get("properties") or {}
    aliases = {field.alias or name: (name, field) for name, field in model.model_fields.items()}
    for extra in sorted(set(properties) - set(aliases)):
        yield f"{path}.{extra}: in the CRD, not in operator/spec.py"
    for alias, (_, field) in aliases.items():
        if alias not in properties:
            yield f"{path}.{alias}: in operator/spec.py, not in the CRD"
            continue
        prop = properties[alias]
        required = field.is_required()
        if required != (alias in (schema.get("required") or [])):
            yield f"{path}.{alias}: required is {required} in the model"
        annotation = field.annotation
        nested = next((arg for arg in getattr(annotation, "__args__", (annotation,))
                       if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        if nested is not None:  # a section, or a list of them (the CRD's `items`)
            yield from _model_fields(nested, prop.get("items", prop), f"{path}.{alias}")
        elif field.default is not PydanticUndefined and field.default is not None:
            if prop.get("default") != field.default:
                yield f"{path}.{alias}: default {field.default!r} in the model, {prop.get('default')!r} in the CRD"


def test_crd_rules_name_only_fields_of_their_level() -> None:
    """The API server type-checks each rule against its schema when the CRD is applied:
    a rule naming a field its level lacks would make the whole CRD fail to apply."""
    rules = [(path, schema, rule) for path, schema in walk(SCHEMA) for rule in schema.get("x-kubernetes-validations", [])]
    assert len(rules) == 7, "a rule was added or removed: give it cases in test_crd_rules_agree_with_the_spec_model"
    for path, schema, rule in rules:
        cel_program(rule["rule"])  # compiles
        named = set(re.findall(r"\bself\.(\w+)", rule["rule"]))
        assert named <= set(schema.get("properties") or {}), (path, rule["rule"])  # a scalar's rule names none


def spec_with(**sections: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL_SPEC with these sections' keys replaced."""
    spec = copy.deepcopy(MINIMAL_SPEC)
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


PHOTOS_CLAIM = "data.instanceImages.claimName"
VOLCANO = {"gangScheduling": {"podGroup": "volcano"}}


@pytest.mark.parametrize("spec, refused_field", [
    (MINIMAL_SPEC, None),
    (FULL_SPEC, None),
    *[(yaml.safe_load(path.read_text())["spec"], None) for path in EXAMPLES],
    (spec_with(data={"instanceImages": {"claimName": "photos", "url": "s3://bucket/photos/"}}), PHOTOS_CLAIM),
    (spec_with(data={"instanceImages": {"configMapName": "photos", "claimName": "photos"}}), PHOTOS_CLAIM),
    (spec_with(data={"instanceImages": {"path": "/dogs"}}), PHOTOS_CLAIM),
    (spec_with(data={"instanceImages": {"url": "s3://bucket/photos/", "credentialsSecret": "s3"}}), None),
    (spec_with(storage={"size": "10Gi"}), "storage.claimName"),  # and MINIMAL_SPEC's claimName
    (spec_with(storage={"claimName": None}), "storage.claimName"),
    (spec_with(metrics={"port": 29500}), "metrics.port"),
    (spec_with(metrics={"port": 80}), "metrics.port"),
    (spec_with(metrics={"port": 0}), None),
    (spec_with(metrics={"port": 1024}), None),
    (spec_with(runPolicy={"gangScheduling": {"podGroup": "coscheduling", "queue": "gpus"}}),
     "runPolicy.gangScheduling.queue"),
    (spec_with(runPolicy={"gangScheduling": {"podGroup": "volcano", "scheduleTimeoutSeconds": 60}}),
     "runPolicy.gangScheduling.scheduleTimeoutSeconds"),
    (spec_with(runPolicy={"gangScheduling": {"podGroup": "volcano", "queue": "gpus"}}), None),
    (spec_with(runPolicy={"gangScheduling": {"podGroup": "coscheduling", "scheduleTimeoutSeconds": 60}}), None),
    (spec_with(runPolicy=VOLCANO, workers={"schedulerName": "default-scheduler"}), "workers.schedulerName"),
    (spec_with(runPolicy=VOLCANO, workers={"schedulerName": "volcano"}), None),
    (spec_with(workers={"schedulerName": "my-scheduler"}), None),
    (spec_with(workers={"nodes": 2, "minNodes": 3}), "workers.minNodes"),
    (spec_with(workers={"nodes": 2, "minNodes": 2}), None),
    (spec_with(workers={"nodes": 4, "minNodes": 1}), None),
], ids=lambda value: "" if isinstance(value, dict) else str(value))
def test_crd_rules_agree_with_the_spec_model(spec: dict[str, Any], refused_field: str | None) -> None:
    """What the CRD's rules refuse at `kubectl apply`, the operator's model refuses too
    (a job created before the CRD had the rule), both naming the field; what they let
    through, the model accepts."""
    spec = {**spec, "storage": {k: v for k, v in spec["storage"].items() if v is not None}}
    violations = rule_violations(SCHEMA["properties"]["spec"], spec, "spec")
    if refused_field is None:
        assert violations == []
        parse_spec(spec)
        return
    assert violations and all(refused_field in violation for violation in violations), violations
    with pytest.raises(InvalidSpecError) as error:
        parse_spec(spec)
    assert refused_field in str(error.value)


def test_crd_spec_schema_matches_the_operator_spec_model() -> None:
    assert list(_model_fields(JobSpec, SCHEMA["properties"]["spec"], "spec")) == []


@pytest.mark.parametrize("spec", [MINIMAL_SPEC, FULL_SPEC, *[yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES]],
                         ids=["minimal", "full", *[p.stem for p in EXAMPLES]])
def test_example_specs_pass_the_crd_schema_and_the_model(spec: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(SCHEMA["properties"]["spec"]).validate(spec)
    assert unknown_fields(SCHEMA["properties"]["spec"], spec) == []
    JobSpec.model_validate(spec)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_an_example_on_one_node_asks_for_a_claim_the_default_block_disk_class_can_bind(path: Path) -> None:
    """ReadWriteMany (the default) never binds on GKE's, EBS's or Azure Disk's default
    class: the claim stays Pending, and so do the workers. Only a gang across nodes needs it."""
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text())["spec"])
    if spec.storage.size is not None:
        wanted = "ReadWriteMany" if spec.workers.nodes > 1 else "ReadWriteOnce"
        assert spec.storage.access_mode == wanted, path.name


def test_crd_schema_rejects_what_the_model_rejects() -> None:
    validator = jsonschema.Draft4Validator(SCHEMA["properties"]["spec"])
    bad = {**MINIMAL_SPEC, "workers": {**MINIMAL_SPEC["workers"], "nodes": 0}}
    assert not validator.is_valid(bad)
    bad = {**MINIMAL_SPEC, "training": {"precision": "fp8"}}
    assert not validator.is_valid(bad)


def test_every_status_the_operator_writes_fits_the_schema() -> None:
    # status.output.loraWeights with LoRA, status.gangNodes with minNodes
    spec = JobSpec.model_validate({**FULL_SPEC, "lora": {"rank": 8}, "workers": {**FULL_SPEC["workers"], "minNodes": 1}})
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    failed = {"metadata": {"name": "sks-dog-worker-0", "labels": {"dreambooth.io/gang": "0",
                                                                  "dreambooth.io/worker-index": "0"}},
              "status": {"phase": "Failed", "containerStatuses": [
                  {"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "boom"}}}]}}
    status = decide(spec, {}, [], now).status
    status = decide(spec, {**status, "phase": c.PHASE_RUNNING}, [failed], now).status
    assert status["lastFailure"]["exitCode"] == 1
    evicted = {"metadata": {**failed["metadata"], "labels": {**failed["metadata"]["labels"], "dreambooth.io/gang": "1"}},
               "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}}
    status = decide(spec, {**status, "phase": c.PHASE_RUNNING}, [evicted], now).status
    assert status["consecutivePreemptions"] == 1
    long_ago = now - dt.timedelta(hours=1)
    status = decide(spec, {**status, "phase": c.PHASE_PENDING},
                    [pod(0, gang=2, created=long_ago), unscheduled(1, gang=2, created=long_ago)], now).status
    assert status["gangNodes"] == 1
    status.update(step=10, progress="1%", loss=0.5, samplesPerSecond=1.0, etaSeconds=3.0,
                  latestCheckpoint={"step": 10, "path": "/x/step-00000010", "time": "2026-01-01T00:00:00Z"})
    status["output"] = output_status(Job(name="sks-dog", namespace="default", uid="u", spec=spec))
    status["observedGeneration"] = 3  # the reconciler's, from metadata.generation
    status_schema = SCHEMA["properties"]["status"]
    jsonschema.Draft4Validator(status_schema).validate(status)
    assert unknown_fields(status_schema, status) == []


@pytest.mark.parametrize("path", [REPO / "manifests" / "install.yaml", *EXAMPLES], ids=lambda p: p.name)
def test_plain_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for document in documents:
        if document["kind"] == c.KIND:
            continue  # a custom resource: checked against the CRD above
        validate_for_supported_kubernetes(document)


def test_operator_rbac_covers_what_it_calls() -> None:
    documents = list(yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()))
    # The ClusterRoles bound to the operator's service account (discovery + its own), not the users' aggregated ones.
    bound = {d["roleRef"]["name"] for d in documents if d["kind"] == "ClusterRoleBinding"}
    roles = [d for d in documents if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound]
    granted = {(group, resource, verb) for role in roles for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = [("dreambooth.io", "dreamboothjobs", "watch"), ("dreambooth.io", "dreamboothjobs/status", "patch"),
              ("", "pods", "create"), ("", "pods", "delete"), ("", "pods", "watch"), ("", "services", "create"),
              ("", "configmaps", "patch"), ("", "persistentvolumeclaims", "create"), ("", "events", "create"),
              # operator/inputs.py reads a job's ConfigMap of photos before creating its pods.
              ("", "configmaps", "get")]
    assert [need for need in needed if need not in granted] == []


def test_printer_columns_point_at_status_fields_the_operator_writes() -> None:
    from dreambooth_operator.scrape import parse_metrics, progress_status

    scraped = progress_status(parse_metrics("dreambooth_step 5\ndreambooth_max_steps 10\ndreambooth_loss 0.5\n"),
                              {}, "/c", "2026-01-01T00:00:00Z")
    # What lifecycle.decide writes, up to an elastic gang's shrinking (status.gangNodes).
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    elastic = JobSpec.model_validate(spec_with(workers={"nodes": 2, "minNodes": 1}))
    shrunk = decide(elastic, {"phase": c.PHASE_RUNNING}, [pod(0), unscheduled(1, created=now - dt.timedelta(hours=1))],
                    now).status
    written = set(scraped) | set(shrunk)
    status_properties = SCHEMA["properties"]["status"]["properties"]
    for column in VERSION["additionalPrinterColumns"]:
        path = column["jsonPath"].split(".")[1:]
        if path[0] == "metadata":
            continue
        if path[0] == "spec":  # a field of the spec the user wrote (a default fills it in)
            node = SCHEMA
            for part in path:
                node = node["properties"][part]
            assert node["type"] == column["type"] and "default" in node, column
            continue
        assert path[0] == "status" and len(path) == 2, column
        assert path[1] in status_properties and path[1] in written, column
        kind = {"integer": int, "number": (int, float), "string": str}[column["type"]]
        if path[1] in scraped:
            assert isinstance(scraped[path[1]], kind), column


def test_the_emulated_admission_prunes_defaults_and_keeps_each_writer_to_its_part() -> None:
    """How the emulated API stores a job (crd_admission.admit), as an API server does."""
    version = VERSION["name"]
    job = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "j"}, "status": {"phase": "Running"},
           "spec": {**MINIMAL_SPEC, "typo": 1, "storage": {"claimName": "ckpt", "size": None}}}
    stored, problems = admit(CRD, version, None, job, None)
    assert problems == []
    assert "typo" not in stored["spec"] and stored["spec"]["storage"] == {"claimName": "ckpt", "retain": True,
                                                                          "accessMode": "ReadWriteMany"}
    assert stored["spec"]["runPolicy"]["backoffLimit"] == 3  # a default inside a default
    assert "status" not in stored  # only /status writes it
    # /status changes the status only (its unknown fields pruned); the resource, all but the status.
    edited = {**stored, "spec": {**stored["spec"], "training": {"maxSteps": 5}}, "status": {"restarts": 1, "x": 2}}
    after, problems = admit(CRD, version, stored, edited, "status")
    assert problems == [] and after["spec"] == stored["spec"] and after["status"] == {"restarts": 1}
    later, problems = admit(CRD, version, after, {**edited, "status": {}}, None)
    assert problems == [] and later["status"] == {"restarts": 1} and later["spec"]["training"]["maxSteps"] == 5
    # Wrong types and broken rules are refused, naming the field.
    _, problems = admit(CRD, version, stored, {**stored, "status": {"restarts": "two"}}, "status")
    assert problems == ["status.restarts: Invalid value: 'two': 'two' is not of type 'integer'"]
    for time in ("2026-11-29", "2026-11-29T09:00:00", "2026-02-30T09:00:00Z", "yesterday"):
        _, problems = admit(CRD, version, stored, {**stored, "status": {"startTime": time}}, "status")
        assert problems == [f"status.startTime: Invalid value: {time!r}: {time!r} is not a 'date-time'"]
    for time in ("2026-11-29T09:00:00Z", "2026-11-29T09:00:00.5+01:00"):
        assert admit(CRD, version, stored, {**stored, "status": {"startTime": time}}, "status")[1] == []
    _, problems = admit(CRD, version, stored, {**stored, "spec": {**stored["spec"], "metrics": {"port": 80}}}, None)
    assert problems == ["spec.metrics.port: metrics.port: 0 (off), or a port from 1024 up (the workers cannot bind "
                        "lower ones) other than 29500 (their rendezvous)"]



def test_the_emulated_admission_ratchets_what_an_update_leaves_unchanged() -> None:
    """A job stored before the CRD got stricter (kubeVersion >= 1.30: validation ratcheting):
    what an update leaves as it was is not refused, so its status, finalizers and other
    fields can still be written; a change to a field that breaks a rule is refused."""
    version = VERSION["name"]
    stored, _ = admit(CRD, version, None, {"apiVersion": c.API_VERSION, "kind": c.KIND,
                                           "metadata": {"name": "j", "finalizers": ["dreambooth.io/cleanup"]},
                                           "spec": MINIMAL_SPEC}, None)
    older = {**stored, "spec": {**stored["spec"], "metrics": {"port": 80},
                                "workers": {**stored["spec"]["workers"], "nodes": 0}}}
    broken = ["spec.workers.nodes: Invalid value: 0: 0 is less than the minimum of 1",
              "spec.metrics.port: metrics.port: 0 (off), or a port from 1024 up (the workers cannot bind lower ones) "
              "other than 29500 (their rendezvous)"]
    assert admit(CRD, version, None, older, None)[1] == broken  # created today: refused
    unfinalized = {**older, "metadata": {"name": "j", "finalizers": []}}
    assert admit(CRD, version, older, unfinalized, None)[1] == []
    assert admit(CRD, version, older, {**older, "status": {"phase": "Failed"}}, "status")[1] == []
    other_field = {**older, "spec": {**older["spec"], "training": {"maxSteps": 5}}}
    assert admit(CRD, version, older, other_field, None)[1] == []
    _, problems = admit(CRD, version, older, {**older, "spec": {**older["spec"], "metrics": {"port": 29500}}}, None)
    assert problems == broken[1:]  # the edited field is checked, the unchanged one still ratcheted


def test_the_reference_page_is_the_crds() -> None:
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "render_crd_reference.py"), "--check"])
    assert check.returncode == 0, "docs/dreamboothjob.md is stale: run python scripts/render_crd_reference.py"
