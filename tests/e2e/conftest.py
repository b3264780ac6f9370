"""End-to-end tests: the helpers beside this file (kubelet, pod_sandbox) and the operator
suite's (emulated_cluster, operator_harness) import by their plain names, as they do there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    # Lets a fixture see whether its test failed, to print the cluster's state then.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)
