"""The whole chain as a user drives it: `kubectl apply` -> the real operator -> a gang of
two worker pods running the real torchrun + DeepSpeed trainer -> failures, preemption
and suspension -> resume from the checkpoint -> an exported model, on the claim or
uploaded to a bucket.

One emulated API (kmock), one operator process (as the chart runs it, under only the
RBAC the chart grants it, which the emulated API enforces), one kubelet (tests/e2e/kubelet.py, which
runs the pods as local processes on their own loopback addresses) and one real
Prometheus serve all scenarios; each scenario is one job of its own, the README's
example (`manifests/examples/tiny-cpu-job.yaml`: 2 nodes x 1 process, ZeRO-2, tiny
model, prior preservation, 30 steps, a checkpoint every 5) under another name; a scenario that
interrupts its job runs it longer (INTERRUPTED_JOB_STEPS), so that the job cannot end first.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import s3fs
import yaml
from emulated_cluster import EmulatedCluster
from operator_harness import Cluster, OperatorProcess, condition, project_kubectl, wait_for

from kubelet import Kubelet
from tests.ship.chart_operator import chart_operator
from tests.trainer.object_stores import s3_server
from tests.trainer.prometheus_server import PrometheusServer, install_prometheus
from trainer.publish import COMPLETE_MARKER

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "tiny-cpu-job.yaml"
PHOTOS = REPO / "examples" / "instance-images"
# A first run compiles DeepSpeed's CPU op (cached later); a gang start takes ~20 s here.
JOB_TIMEOUT = 360
# Steps of a job that a scenario interrupts after its checkpoint of step 10: a tiny step
# takes under a tenth of a second, and the interruption must land before the job ends.
INTERRUPTED_JOB_STEPS = 80

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# --- the cluster, shared by every scenario ---------------------------------------------

@pytest.fixture(scope="module")
def kubectl_binary() -> Path:
    return project_kubectl()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedCluster]:
    cluster = EmulatedCluster(tmp_path_factory.mktemp("e2e-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def kubelet(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubelet]:
    root = tmp_path_factory.mktemp("e2e-node")
    node = Kubelet(emulated.kubeconfig, root, scrape_targets=root / "scrape-targets.json").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def prometheus(kubelet: Kubelet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    # Scrapes every pod's `metrics` port (the kubelet keeps the file_sd list), often
    # enough to see the few steps a gang makes between a checkpoint and its failure.
    server = PrometheusServer(install_prometheus(), tmp_path_factory.mktemp("e2e-prometheus"), [],
                              target_files=[kubelet.scrape_targets], scrape_interval="250ms")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def operator(emulated: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """As the chart installs it: its arguments (leader election included), and only the
    RBAC the chart grants its service account, which the emulated API enforces."""
    process, _ = chart_operator(emulated, tmp_path_factory.mktemp("e2e-operator"))
    yield process.start()
    process.stop()


@pytest.fixture(autouse=True)
def nothing_refused(emulated: EmulatedCluster, operator: OperatorProcess) -> Iterator[None]:
    yield
    assert emulated.refused() == [], f"the chart's RBAC refused the operator these calls; log:\n{operator.log()}"


class User:
    """What the user does and sees: kubectl, and the job's files on the claim."""

    def __init__(self, emulated: EmulatedCluster, kubectl_binary: Path, kubelet: Kubelet) -> None:
        self.emulated = emulated
        self.binary = kubectl_binary
        self.kubelet = kubelet
        self.cluster = Cluster(emulated)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run([str(self.binary), "--kubeconfig", str(self.emulated.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
        return result.stdout

    def apply_example(self, name: str, **spec_changes: dict[str, Any]) -> None:
        """The README's example job under another name, with some spec sections changed
        (a field set to None is removed)."""
        job = yaml.safe_load(EXAMPLE.read_text())
        job["metadata"]["name"] = name
        for section, values in spec_changes.items():
            fields = job["spec"].setdefault(section, {})
            fields.update(values)
            for key in [key for key, value in values.items() if value is None]:
                del fields[key]
        out = self.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
        assert f"dreamboothjob.dreambooth.io/{name} created" in out

    def status(self, name: str) -> dict[str, Any]:
        return self.cluster.status(name)

    def wait_phase(self, name: str, phase: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == "Failed" != phase:  # final: no point waiting out the timeout
                raise AssertionError(f"{name} failed while waiting for {phase}: {status.get('lastFailure')}")
            return status if status.get("phase") == phase else None

        return wait_for(reached, timeout=timeout, what=f"{name} phase {phase}")

    def job_dir(self, name: str) -> Path:
        # The operator's layout: the claim `<job>-storage` mounted at /mnt/storage, the job under /<job>.
        return self.kubelet.claim_folder(f"{name}-storage") / name

    def latest_checkpoint(self, name: str) -> str:
        latest = self.job_dir(name) / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.exists() else ""

    def checkpointed_step(self, name: str) -> int:
        """The step of the latest complete checkpoint (0 before the first)."""
        latest = self.latest_checkpoint(name)
        return int(latest.removeprefix("step-")) if latest else 0

    def run_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.job_dir(name) / "output" / "run.json").read_text())


@pytest.fixture(scope="module")
def user(emulated: EmulatedCluster, kubectl_binary: Path, kubelet: Kubelet, operator: OperatorProcess,
         prometheus: PrometheusServer) -> User:
    person = User(emulated, kubectl_binary, kubelet)
    # The README's quick start.
    person.kubectl("apply", "--validate=false", "-f", str(REPO / "manifests" / "crd.yaml"))
    person.kubectl("create", "configmap", "robot-photos", f"--from-file={PHOTOS}/")
    return person


@pytest.fixture(autouse=True)
def explain_failure(request: pytest.FixtureRequest, user: User, operator: OperatorProcess,
                    kubelet: Kubelet) -> Iterator[None]:
    """On failure: the operator's log, every pod's output and the jobs' status; then the
    jobs are deleted, so that a gang the failed scenario left running does not hold the
    next one's rendezvous port (all pods here share the host's network)."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        jobs = json.loads(user.kubectl("get", "dbj", "-o", "json"))["items"]
        print("=== operator log ===\n" + operator.log())
        print("=== pods (kubelet) ===\n" + kubelet.logs())
        print(f"=== kubelet error === {kubelet.error!r}")
        print("=== jobs ===\n" + json.dumps([{j["metadata"]["name"]: j.get("status")} for j in jobs], indent=1))
        user.kubectl("delete", "dbj", "--all", "--wait=false")
        kubelet.max_pods = None
        wait_for(lambda: not user.cluster.all_pods(), timeout=180, what="the failed scenario's pods gone")


def trainer_events(kubelet: Kubelet, pod: str, uid_prefix: str = "") -> list[dict[str, Any]]:
    """The JSON log events (logging.format: json) a pod's trainer printed."""
    events = []
    for folder in (kubelet.root / "pods").glob(f"default_{pod}_{uid_prefix}*"):
        try:
            output = (folder / "output.log").read_text(errors="replace")
        except FileNotFoundError:  # a pod the kubelet is starting: its folder is made first
            continue
        for line in output.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    return events


# --- scenarios ---------------------------------------------------------------------------

def test_apply_runs_the_gang_to_an_exported_model(user: User, kubelet: Kubelet) -> None:
    out = user.kubectl("apply", "--validate=false", "-f", str(EXAMPLE))
    assert "dreamboothjob.dreambooth.io/tiny-cpu created" in out
    status = user.wait_phase("tiny-cpu", "Succeeded")

    assert status["step"] == 30 and status["progress"] == "100%"
    assert status["restarts"] == 0 and status["preemptions"] == 0
    # The loss shown is the run's last, not the one of the scrape before the run ended:
    # rank 0 served its final metrics until the operator's next scrape.
    last_step = [e for e in trainer_events(kubelet, "tiny-cpu-worker-0") if e.get("event") == "step"][-1]
    assert last_step["step"] == 30 and status["loss"] == pytest.approx(last_step["loss"], abs=1e-6)
    assert condition(status, "Succeeded")["status"] == "True"
    # The status says where the model is: a folder of the claim, as the trainer wrote it.
    output = status["output"]
    assert (kubelet.claim_folder(output["claimName"]) / output["path"]) == user.job_dir("tiny-cpu") / "output"
    run = user.run_json("tiny-cpu")
    assert run["final_step"] == 30 and run["resumed_from_step"] is None
    assert (run["world_size"], run["zero_stage"]) == (2, 2)
    # Prior preservation: the class images were generated onto the claim.
    assert len(list((user.job_dir("tiny-cpu") / "class-images").glob("*.png"))) == 4

    # It learned its subject (the trainer's fixed-noise loss on the instance photos) ...
    assert run["instance_eval_loss_after"] < run["instance_eval_loss_before"]
    # ... and the exported folder is a pipeline that loads and draws.
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(user.job_dir("tiny-cpu") / "output")
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of sks robot", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    header, row = user.kubectl("get", "dbj", "tiny-cpu").splitlines()
    assert header.split() == ["NAME", "PHASE", "STEP", "PROGRESS", "LOSS", "RESTARTS", "AGE"]
    name, phase, step, progress, loss, restarts, age = row.split()
    assert (name, phase, step, progress, restarts) == ("tiny-cpu", "Succeeded", "30", "100%", "0")
    assert float(loss) == pytest.approx(status["loss"], rel=1e-4)
    assert age.endswith(("s", "m"))


def test_killed_worker_restarts_the_gang_from_the_checkpoint(user: User, kubelet: Kubelet,
                                                             prometheus: PrometheusServer) -> None:
    # A checkpoint every 20 steps: the kill must come before the next one is complete, and a
    # tiny step takes under a tenth of a second.
    checkpointed, last = 20, 50
    user.apply_example("tiny-kill", checkpoint={"everySteps": checkpointed}, training={"maxSteps": last})
    started = time.time()
    # Kill -9 a trainer of worker-1 a few steps after the checkpoint of step 20, once
    # Prometheus has seen rank 0 go past it.
    wait_for(lambda: user.latest_checkpoint("tiny-kill") == "step-00000020", timeout=JOB_TIMEOUT,
             what="checkpoint step-00000020 of tiny-kill")
    wait_for(lambda: max(steps_seen(prometheus, "tiny-kill", started), default=0) > checkpointed,
             timeout=30, what=f"Prometheus seeing step > {checkpointed}")
    kubelet.kill_trainer("tiny-kill-worker-1")
    latest_at_kill = user.latest_checkpoint("tiny-kill")

    status = user.wait_phase("tiny-kill", "Succeeded")
    assert status["restarts"] == 1 and status["preemptions"] == 0
    assert status["lastFailure"]["pod"] in ("tiny-kill-worker-0", "tiny-kill-worker-1")
    assert status["step"] == last
    run = user.run_json("tiny-kill")
    assert latest_at_kill == "step-00000020", "the kill came too late: a later checkpoint was already complete"
    assert run["resumed_from_step"] == checkpointed and run["final_step"] == last

    # Prometheus saw rank 0's step pass 20, fall back to 20 in the new gang, then reach the last.
    steps = wait_for(lambda: (s := steps_seen(prometheus, "tiny-kill", started)) and s[-1] == last and s,
                     timeout=20, what=f"Prometheus seeing step {last}")
    past_checkpoint = next(i for i, step in enumerate(steps) if step > checkpointed)
    fallback = next((i for i in range(past_checkpoint, len(steps)) if steps[i] == checkpointed), None)
    assert fallback is not None, f"no fall back to step {checkpointed} after step {steps[past_checkpoint]}: {steps}"
    assert steps[fallback:] == sorted(steps[fallback:]), f"the resumed gang's step went back: {steps}"


def steps_seen(prometheus: PrometheusServer, job: str, since: float) -> list[int]:
    """Every scraped value of rank 0's `dreambooth_step` for a job, in time order
    (all gangs: each is its own series, on its own pod address)."""
    window = max(1, int(time.time() - since) + 5)
    result = prometheus.api("query", query=f'dreambooth_step{{job="{job}"}}[{window}s]')["result"]
    samples = sorted((float(t), int(float(v))) for series in result for t, v in series["values"])
    return [value for _, value in samples]


def test_graceful_delete_of_a_worker_checkpoints_and_is_not_counted(user: User, kubelet: Kubelet) -> None:
    # backoffLimit 0: a restart counted as a failure would fail the job.
    user.apply_example("tiny-preempt", runPolicy={"backoffLimit": 0}, training={"maxSteps": INTERRUPTED_JOB_STEPS})
    wait_for(lambda: user.checkpointed_step("tiny-preempt") >= 10, timeout=JOB_TIMEOUT,
             what="a checkpoint of step 10 or later of tiny-preempt")
    first = kubelet.pod("tiny-preempt-worker-0")
    user.kubectl("delete", "pod", "tiny-preempt-worker-0", "--wait=false")

    status = user.wait_phase("tiny-preempt", "Succeeded")
    assert status["restarts"] == 0 and status["preemptions"] == 1
    # Worker-0's trainer finished its step, checkpointed there and exited 143 ...
    assert kubelet.exit_codes[first.uid] == 143
    stopped = [e for e in trainer_events(kubelet, "tiny-preempt-worker-0", first.uid[:8])
               if "SIGTERM" in str(e.get("event") or e.get("message"))]
    assert stopped, "worker-0 logged no stop by SIGTERM"
    stop_step = stopped[-1]["step"]
    assert stop_step >= 10
    # ... and the next gang resumed from exactly that step.
    run = user.run_json("tiny-preempt")
    assert run["resumed_from_step"] == stop_step and run["final_step"] == INTERRUPTED_JOB_STEPS


def test_suspend_then_resume_continues_from_the_suspend_checkpoint(user: User, kubelet: Kubelet) -> None:
    user.apply_example("tiny-suspend", training={"maxSteps": INTERRUPTED_JOB_STEPS})
    wait_for(lambda: user.checkpointed_step("tiny-suspend") >= 10, timeout=JOB_TIMEOUT,
             what="a checkpoint of step 10 or later of tiny-suspend")
    workers = [kubelet.pod(f"tiny-suspend-worker-{i}") for i in range(2)]
    user.kubectl("patch", "dbj", "tiny-suspend", "--type", "merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    user.wait_phase("tiny-suspend", "Suspended", timeout=30)
    wait_for(lambda: user.cluster.pods("tiny-suspend") == [], timeout=90, what="workers stopped and deleted")
    assert [kubelet.exit_codes[w.uid] for w in workers] == [143, 143]
    suspended_at = user.checkpointed_step("tiny-suspend")
    assert 10 <= suspended_at < INTERRUPTED_JOB_STEPS

    user.kubectl("patch", "dbj", "tiny-suspend", "--type", "merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    status = user.wait_phase("tiny-suspend", "Succeeded")
    assert status["restarts"] == 0
    run = user.run_json("tiny-suspend")
    assert run["resumed_from_step"] == suspended_at and run["final_step"] == INTERRUPTED_JOB_STEPS


def test_a_gang_resized_while_it_trains_resumes_its_checkpoint_on_fewer_nodes(user: User, kubelet: Kubelet) -> None:
    """`kubectl patch` of workers.nodes 2 -> 1 mid-run: the operator restarts the gang at
    the new size (a preemption, not a failure: backoffLimit 0 holds), and the one worker
    converts the checkpoint that two ranks wrote (DeepSpeed's universal checkpoint)."""
    user.apply_example("tiny-resize", runPolicy={"backoffLimit": 0}, training={"maxSteps": INTERRUPTED_JOB_STEPS})
    wait_for(lambda: user.checkpointed_step("tiny-resize") >= 10, timeout=JOB_TIMEOUT,
             what="a checkpoint of step 10 or later of tiny-resize")
    first = kubelet.pod("tiny-resize-worker-0")
    user.kubectl("patch", "dbj", "tiny-resize", "--type", "merge", "-p", '{"spec":{"workers":{"nodes":1}}}')
    status = user.wait_phase("tiny-resize", "Succeeded")
    assert (status["restarts"], status["preemptions"]) == (0, 1)
    assert {pod["metadata"]["name"] for pod in user.cluster.pods("tiny-resize")} <= {"tiny-resize-worker-0"}
    run = user.run_json("tiny-resize")
    assert (run["world_size"], run["final_step"]) == (1, INTERRUPTED_JOB_STEPS) and run["resumed_from_step"] >= 10
    resumed = [event for event in trainer_events(kubelet, "tiny-resize-worker-0")
               if event["event"] == "resumed" and event.get("world_size") == "2 -> 1"]
    assert [event["step"] for event in resumed] == [run["resumed_from_step"]], resumed
    assert kubelet.exit_codes[first.uid] == 143  # the first gang checkpointed on its way out


def test_an_elastic_gang_goes_on_without_a_lost_node_and_grows_back_when_it_returns(user: User,
                                                                                      kubelet: Kubelet) -> None:
    """workers.minNodes 1: a worker drained off its node (a graceful delete) when the
    cluster has room for one worker only (the node's pod capacity: the scheduler says
    Too many pods). The operator restarts the gang for 2 nodes, and once the second
    worker has waited out the pending timeout, on the one node, which resumes the
    checkpoint that two ranks wrote. Room again: the standby pod of worker 1 is placed,
    and the gang grows back to 2, resuming what one rank wrote (backoffLimit 0 holds:
    no restart counts)."""
    user.apply_example("tiny-elastic", workers={"minNodes": 1}, runPolicy={"backoffLimit": 0},
                       training={"maxSteps": INTERRUPTED_JOB_STEPS})
    wait_for(lambda: user.checkpointed_step("tiny-elastic") >= 10, timeout=JOB_TIMEOUT,
             what="a checkpoint of step 10 or later of tiny-elastic")
    kubelet.max_pods = 1
    try:
        user.kubectl("delete", "pod", "tiny-elastic-worker-1", "--wait=false")
        wait_for(lambda: resumed(kubelet, "tiny-elastic-worker-0", "2 -> 1"), timeout=JOB_TIMEOUT,
                 what="the gang resumed on one node")
        assert user.status("tiny-elastic")["gangNodes"] == 1
        wide = table_row(user.kubectl("get", "dbj", "tiny-elastic", "-o", "wide"))
        assert (wide["NODES"], wide["SHRUNK"], wide["PREEMPTIONS"]) == ("2", "1", "2")
    finally:
        kubelet.max_pods = None
    status = user.wait_phase("tiny-elastic", "Succeeded")
    assert (status["restarts"], status["preemptions"]) == (0, 3) and "gangNodes" not in status
    events = {event["reason"]: event["message"] for event in user.cluster.events("tiny-elastic")}
    assert "tiny-elastic-worker-1: 0/1 nodes are available: 1 Too many pods." in events["GangShrunk"]
    assert events["GangGrown"].startswith("the scheduler placed tiny-elastic-standby-1")
    run = user.run_json("tiny-elastic")
    assert (run["world_size"], run["final_step"]) == (2, INTERRUPTED_JOB_STEPS)
    [shrunk] = resumed(kubelet, "tiny-elastic-worker-0", "2 -> 1")
    [grown] = resumed(kubelet, "tiny-elastic-worker-0", "1 -> 2")
    assert 10 <= shrunk["step"] < grown["step"] == run["resumed_from_step"]
    assert user.cluster.pod("tiny-elastic-standby-1") is None


def table_row(output: str) -> dict[str, str]:
    """kubectl's table of one object, by column: each cell sits under its header's first
    letter (an empty cell is blanks, so splitting on them would shift the rest)."""
    header, row = output.splitlines()
    starts = [index for index, char in enumerate(header) if char != " " and (index == 0 or header[index - 1] == " ")]
    return {header[start:end].strip(): row[start:end].strip()
            for start, end in zip(starts, [*starts[1:], max(len(header), len(row))])}


def resumed(kubelet: Kubelet, pod: str, world_sizes: str) -> list[dict[str, Any]]:
    """The `resumed` events of a pod's trainers (every gang's) that changed the world size so."""
    return [event for event in trainer_events(kubelet, pod)
            if event["event"] == "resumed" and event.get("world_size") == world_sizes]


def test_bucket_job_reads_photos_and_uploads_the_model_with_a_credentials_secret(
        user: User, kubelet: Kubelet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`manifests/examples/bucket-job.yaml`'s flow against an S3-compatible store (moto),
    its credentials only in a Secret made the usual way: the AWS shared-credentials file
    (`--from-file`), read through the Secret's mount, and the endpoint as a key, read
    through `envFrom`. Neither reaches the workers any other way. Also spec.validation's
    sample grid, and spec.lora: the adapters' file is uploaded with the fused pipeline."""
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)  # pods inherit the test's environment
    with s3_server() as store:
        bucket = s3fs.S3FileSystem(key=store["AWS_ACCESS_KEY_ID"], secret=store["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": store["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
        name = f"robots-{uuid.uuid4().hex[:8]}"
        bucket.mkdir(name)
        bucket.put(f"{PHOTOS}/", f"{name}/photos/", recursive=True)
        credentials = tmp_path / "credentials"
        credentials.write_text(f"[default]\naws_access_key_id = {store['AWS_ACCESS_KEY_ID']}\n"
                               f"aws_secret_access_key = {store['AWS_SECRET_ACCESS_KEY']}\n")
        user.kubectl("create", "secret", "generic", "bucket-creds", f"--from-file=credentials={credentials}",
                     "--from-literal=AWS_SHARED_CREDENTIALS_FILE=/var/run/secrets/dreambooth/bucket-creds/credentials",
                     f"--from-literal=AWS_ENDPOINT_URL={store['AWS_ENDPOINT_URL']}",
                     f"--from-literal=AWS_DEFAULT_REGION={store['AWS_DEFAULT_REGION']}")
        model_uri = f"s3://{name}/models/sks-robot"
        user.apply_example(
            "tiny-bucket",
            data={"instanceImages": {"url": f"s3://{name}/photos/", "credentialsSecret": "bucket-creds"},
                  "classPrompt": None},
            output={"uri": model_uri, "credentialsSecret": "bucket-creds"},
            training={"maxSteps": 5},
            lora={"rank": 4},
            validation={"everySteps": 5, "numInferenceSteps": 2})
        status = user.wait_phase("tiny-bucket", "Succeeded")

        assert status["restarts"] == 0 and status["step"] == 5
        # The photos were copied once onto the claim, for both pods, saying from where.
        photos = user.job_dir("tiny-bucket") / "instance-images"
        assert sorted(path.name for path in photos.glob("[!.]*")) == sorted(path.name for path in PHOTOS.iterdir())
        assert json.loads((photos / ".fetched.json").read_text())["source"] == f"s3://{name}/photos/"
        # The model is on the claim and in the bucket, file for file, the marker last.
        run = user.run_json("tiny-bucket")
        assert run["upload"] == {"uri": model_uri, "ok": True} and run["lora_rank"] == 4
        assert status["output"]["uri"] == model_uri
        assert status["output"]["loraWeights"] == "tiny-bucket/output/pytorch_lora_weights.safetensors"
        model = user.job_dir("tiny-bucket") / "output"
        local = sorted(str(path.relative_to(model)) for path in model.rglob("*") if path.is_file())
        assert {"model_index.json", "pytorch_lora_weights.safetensors"} <= set(local)
        prefix = model_uri.removeprefix("s3://") + "/"
        assert sorted(key.removeprefix(prefix) for key in bucket.find(prefix)) == sorted([*local, COMPLETE_MARKER])
        for file in local:
            if file != "run.json":  # the local copy records the upload afterwards
                assert bucket.cat(prefix + file) == (model / file).read_bytes(), file
        assert json.loads(bucket.cat(prefix + COMPLETE_MARKER)) == {"files": len(local)}
        # spec.validation: a grid of samples at the last step, on the claim beside the checkpoints.
        from PIL import Image

        with Image.open(user.job_dir("tiny-bucket") / "samples" / "step-00000005.png") as grid:
            assert grid.size[1] == 64
