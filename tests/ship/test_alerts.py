"""The shipped alerting rules (dashboards/alerts.yaml), with Prometheus' own promtool:
they load, and `promtool test rules` plays each trouble as series and checks which
alerts fire, with which labels and text (tests/ship/alerts_test.yaml). The same rules
are evaluated against a real run's series in test_dashboard.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.ship.chart import ALERTS
from tests.trainer.prometheus_server import install_prometheus

UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")


@pytest.fixture(scope="module")
def promtool() -> str:
    return str(Path(install_prometheus()).with_name("promtool"))


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def test_the_rules_load(promtool) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_each_alert_fires_on_its_trouble_and_not_on_a_healthy_run(promtool) -> None:
    result = run(promtool, "test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
