"""The chart's PodMonitor, as a real Prometheus applies it: a trainer's series keep its
DreamboothJob's `job`, and the namespace of the pod that served them, whatever the
series say (a tenant's image or a workers.env JOB_NAMESPACE could say another team's)."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tests.ship.chart import ALL_OPTIONS_ON, by_kind, render
from tests.trainer.prometheus_server import PrometheusServer, install_prometheus


def snake_case(value: Any) -> Any:
    """A prometheus-operator relabeling (camelCase keys) as Prometheus' own config."""
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): snake_case(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake_case(item) for item in value]
    return value


@pytest.fixture
def claiming_another_namespace() -> Iterator[str]:
    """A metrics endpoint whose series name the job `sks-dog` and the namespace `team-b`."""
    body = b'dreambooth_step{job="sks-dog",namespace="team-b"} 42\n'

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_series_keeps_its_jobs_name_and_its_pods_namespace(claiming_another_namespace, tmp_path) -> None:
    [pod_monitor] = by_kind(render(ALL_OPTIONS_ON), "PodMonitor")
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    # What prometheus-operator generates from it: the target's own labels (here, the pod's
    # namespace) and the endpoint's honorLabels and metricRelabelings.
    prometheus = PrometheusServer(
        install_prometheus(), tmp_path / "prometheus", [],
        static_configs=[{"targets": [claiming_another_namespace], "labels": {"namespace": "team-a"}}],
        honor_labels=endpoint["honorLabels"],
        metric_relabel_configs=snake_case(endpoint["metricRelabelings"]))
    try:
        deadline = time.monotonic() + 30
        while not (result := prometheus.api("query", query="dreambooth_step")["result"]):
            assert time.monotonic() < deadline, prometheus.logs()
            time.sleep(0.5)
        [series] = result
        labels = {key: value for key, value in series["metric"].items() if key != "instance"}
        assert labels == {"__name__": "dreambooth_step", "job": "sks-dog", "namespace": "team-a"}
    finally:
        prometheus.stop()
