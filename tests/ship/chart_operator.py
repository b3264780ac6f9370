"""The operator as the chart runs it, for tests that start the real operator against the
emulated API: the chart Deployment's arguments and downward-API environment, and a
kubeconfig of its service account, whose RBAC (what the chart binds to it) the emulated
API enforces (tests/operator/rbac.py). A call the chart does not grant then fails in the
test as on a cluster."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # its siblings import by plain name
from emulated_cluster import EmulatedCluster  # noqa: E402
from operator_harness import FAST_FLAGS, OperatorProcess  # noqa: E402
from rbac import grants_of, service_account  # noqa: E402

from tests.ship.chart import NAMESPACE, by_kind, render  # noqa: E402

# The chart's values that set the operator's timings, by the flag each one becomes.
TIMING_VALUES = {"--backoff-seconds": "backoffSeconds", "--backoff-max-seconds": "backoffMaxSeconds",
                 "--resync-seconds": "resyncSeconds", "--scrape-interval": "scrapeIntervalSeconds",
                 "--pending-timeout": "pendingTimeoutSeconds", "--start-timeout": "startTimeoutSeconds"}
# The test harness's short timings (operator_harness.FAST_FLAGS), as chart values.
FAST_VALUES = {TIMING_VALUES[flag]: float(value) for flag, value in zip(FAST_FLAGS[::2], FAST_FLAGS[1::2])}
POD_NAME = "dreambooth-operator-7c9f8d-x2x4q"  # the Deployment's pod, as the downward API names it


def chart_operator(emulated: EmulatedCluster, workdir: Path,
                   values: dict[str, Any] | None = None) -> tuple[OperatorProcess, str]:
    """The operator process (not started) of the chart rendered with `values` (and the
    harness's short timings), and the user it acts as on the API."""
    objects = render({**(values or {}), "operator": FAST_VALUES})
    [deployment] = by_kind(objects, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    account = pod_spec["serviceAccountName"]
    user = f"system:serviceaccount:{NAMESPACE}:{account}"
    kubeconfig = emulated.kubeconfig_for(user, grants_of(objects, service_account(NAMESPACE, account)))
    # Where it listens is the test's to choose (OperatorProcess picks a free port); every other argument is the chart's.
    args = [arg for arg in pod_spec["containers"][0]["args"] if not arg.startswith(("--http-host=", "--http-port="))]
    process = OperatorProcess(emulated, workdir, args, env={"POD_NAMESPACE": NAMESPACE, "POD_NAME": POD_NAME},
                              kubeconfig=kubeconfig)
    return process, user
