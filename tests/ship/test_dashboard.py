"""The shipped dashboard and alerts against real data: a real Prometheus scrapes a real
tiny training (one torchrun process, metrics on) and the real operator managing its job
on the emulated API (with one preemption, so restarts have a series); every panel's
PromQL expression and every template variable is then evaluated through Prometheus' HTTP
API and must parse and return data, and every alerting rule, evaluated all along, must
have run without error and fired nothing for this healthy run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import REPO, tiny_config, write_config
from tests.e2e.pod_sandbox import signal_process_tree
from tests.ship import dashboard as d
from tests.ship.chart import ALERTS
from tests.trainer.prometheus_server import PrometheusServer, free_port, install_prometheus

sys.path.insert(0, str(REPO / "tests" / "operator"))  # the operator harness imports its siblings by name
from emulated_cluster import EmulatedCluster  # noqa: E402
from operator_harness import Cluster, OperatorProcess, terminated, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB, NAMESPACE = "sks-robot", "default"
MAX_STEPS = 6


def start_training(root: Path, port: int) -> subprocess.Popen[bytes]:
    config = tiny_config(
        root,
        training={"max_steps": MAX_STEPS},
        checkpoint={"every_steps": 3, "keep_last": 2},
        # Keeps rank 0's endpoint up after the run until the test is done with it.
        metrics={"port": port, "host": "127.0.0.1", "linger_seconds": 180},
    )
    path = write_config(root, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", JOB_NAME=JOB, JOB_NAMESPACE=NAMESPACE)
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1",
               str(REPO / "trainer" / "main.py"), "--config", str(path)]
    log = open(root / "trainer.log", "wb")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """The run is over and only lingers for the scrapes: end torchrun and its worker at once."""
    if process.poll() is None:
        signal_process_tree(process.pid, signal.SIGKILL)
        process.wait()


def play_kubelet_with_one_preemption(cluster: Cluster) -> None:
    """Workers run (worker-0 at the trainer's address), worker-0 is preempted, the
    operator restarts the gang, the new gang runs."""
    wait_for(lambda: cluster.pods(JOB), what="worker pods")
    cluster.run_pods(JOB, pod_ip="127.0.0.1")
    cluster.set_pod_status(f"{JOB}-worker-0", terminated(143, reason="Error"))
    wait_for(lambda: [p for p in cluster.pods(JOB) if p["metadata"]["labels"]["dreambooth.io/gang"] == "1"],
             what="the restarted gang")
    cluster.run_pods(JOB, pod_ip="127.0.0.1")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrometheusServer, float, Path]]:
    """A Prometheus that has scraped the whole run and the operator; yields it, the
    instant at which the training had finished (all queries are evaluated there) and
    the run's folder."""
    binary = install_prometheus()
    root = tmp_path_factory.mktemp("dashboard")
    trainer_port = free_port()
    emulated = EmulatedCluster(root).start()
    emulated.install_crd()
    operator = OperatorProcess(emulated, root).start()
    training = start_training(root / "run", trainer_port)
    prometheus = PrometheusServer(binary, root / "prometheus",
                                  [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{operator.http_port}"], rule_files=[ALERTS])
    try:
        cluster = Cluster(emulated)
        spec = {"data": {"instanceImages": {"claimName": "robot-photos"}, "instancePrompt": "a photo of sks robot"},
                "workers": {"image": "dreambooth-trainer:0.1.0", "gpusPerNode": 0},
                "storage": {"claimName": "dreambooth-ckpt"}, "metrics": {"port": trainer_port}}
        cluster.create_job(JOB, spec, NAMESPACE)
        play_kubelet_with_one_preemption(cluster)
        done = 'dreambooth_phase{phase="done", job="%s"} == 1' % JOB

        def finished() -> float | None:
            assert training.poll() in (None, 0), (root / "run" / "trainer.log").read_text()[-3000:]
            result = prometheus.api("query", query=done)["result"]
            return float(result[0]["value"][0]) if result else None

        finished_at = wait_for(finished, timeout=180, what="the training to finish")
        # The operator has scraped the finished run into the job's status, and Prometheus the operator.
        wait_for(lambda: cluster.status(JOB, NAMESPACE).get("step") == MAX_STEPS, what="status.step")
        time.sleep(2)
        yield prometheus, finished_at, root / "run"
    finally:
        stop_group(training)
        prometheus.stop()
        operator.stop()
        emulated.stop()


def query(prometheus: PrometheusServer, expr: str, at: float) -> list[dict[str, Any]]:
    try:
        return prometheus.api("query", query=expr, time=at)["result"]
    except Exception as error:  # a parse error comes back as HTTP 400 with Prometheus' reason
        body = getattr(error, "read", lambda: b"")().decode()
        raise AssertionError(f"{expr!r} failed: {error} {body}") from None


def test_every_panel_query_parses_and_returns_data(scraped) -> None:
    prometheus, at, run = scraped
    variables = {"namespace": NAMESPACE, "job": JOB}
    queries = d.panel_queries(d.load())
    assert len(queries) >= 20
    empty, not_finite = [], []
    for q in queries:
        result = query(prometheus, d.substitute(q.expr, variables), at)
        if not result:
            empty.append(f"{q.panel} [{q.ref_id}]: {q.expr}")
        elif not all(math.isfinite(float(sample["value"][1])) for sample in result):
            not_finite.append(f"{q.panel} [{q.ref_id}]: {q.expr} = {result}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not not_finite, "queries with NaN/Inf:\n" + "\n".join(not_finite)


def test_panels_show_the_run(scraped) -> None:
    """A few panels checked for what the run really did, not only for being non-empty."""
    prometheus, at, run = scraped
    variables = {"namespace": NAMESPACE, "job": JOB}
    by_title = {(q.panel, q.ref_id): q.expr for q in d.panel_queries(d.load())}

    def value(panel: str, ref_id: str = "A") -> dict[str, float]:
        result = query(prometheus, d.substitute(by_title[(panel, ref_id)], variables), at)
        return {",".join(f"{v}" for k, v in sorted(s["metric"].items())): float(s["value"][1]) for s in result}

    assert value("Step") == {"": MAX_STEPS}
    assert value("Progress") == {"": 1.0}
    # every series from the operator's start
    assert value("Gang restarts") == {"failure": 0.0, "preemption": 1.0, "shrink": 0.0, "grow": 0.0}
    assert value("Jobs by phase")["Running"] == 1.0
    assert value("Failed reconcile passes") == {"error": 0.0, "forbidden": 0.0}  # a healthy run: none
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert value("Checkpoint", "A") == {"": float(latest.removeprefix("step-"))}
    assert value("Loss: instance and prior", "C")[""] > 0, "prior preservation is on: the prior loss is real"
    assert value("fp16 loss scale") == {"": 1.0}  # bf16 on CPU


def test_a_table_of_several_queries_merges_them_into_one_row_per_training() -> None:
    for panel in d.load()["panels"]:
        if panel.get("type") == "table" and len(panel["targets"]) > 1:
            assert [t["id"] for t in panel.get("transformations", [])][:1] == ["merge"], panel["title"]


def test_template_variables_list_the_job(scraped) -> None:
    prometheus, at, run = scraped
    dashboard = d.load()
    variables = {"namespace": NAMESPACE, "job": JOB}
    found = {}
    for name, (match, label) in d.variable_queries(dashboard).items():
        params = {"start": at - 60, "end": at}
        if match:
            params["match[]"] = d.substitute(match, variables)
        found[name] = prometheus.api(f"label/{label}/values", **params)
    assert NAMESPACE in found["namespace"] and JOB in found["job"], found


def test_every_alert_runs_on_the_real_series_and_none_fires_for_a_healthy_run(scraped) -> None:
    """What promtool's unit tests cannot show: the rules' label matching holds on the
    series a real trainer and operator expose (an error such as many-to-many matching
    would make a rule's health "err")."""
    prometheus, at, run = scraped
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert {rule["name"] for rule in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    assert {rule["name"]: rule["state"] for rule in rules if rule["state"] != "inactive"} == {}
