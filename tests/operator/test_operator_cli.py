"""The command line: flags reach the operator's settings; no cluster is a clear error."""

from __future__ import annotations

import subprocess
import sys

from dreambooth_operator.__main__ import config_from_args, parse_args


def test_flags_reach_the_settings() -> None:
    args = parse_args(["--namespace", "team-a", "-n", "team-b", "--http-port", "0", "--backoff-seconds", "2",
                       "--backoff-max-seconds", "60", "--pending-timeout", "90", "--start-timeout", "120", "--scrape-interval", "5"])
    assert args.namespace == ["team-a", "team-b"]
    config = config_from_args(args)
    assert config.http_port == 0
    timing = config.settings.timing
    assert (timing.backoff_base_seconds, timing.backoff_max_seconds, timing.pending_timeout_seconds) == (2, 60, 90)
    assert timing.start_timeout_seconds == 120
    assert timing.backoff(3) == 8
    assert config.settings.scrape_interval_seconds == 5


def test_network_policies_are_on_unless_turned_off() -> None:
    assert config_from_args(parse_args([])).settings.network_policy is True
    assert config_from_args(parse_args(["--network-policy"])).settings.network_policy is True
    assert config_from_args(parse_args(["--no-network-policy"])).settings.network_policy is False


def test_namespace_and_all_namespaces_exclude_each_other() -> None:
    result = subprocess.run([sys.executable, "-m", "dreambooth_operator", "-n", "a", "--all-namespaces"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_without_a_cluster_it_says_how_to_give_one(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "dreambooth_operator", "--kubeconfig", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no cluster to talk to" in result.stderr and "--kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr

