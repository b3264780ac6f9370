"""The Helm chart as the tests see it: the real `helm` binary (scripts/install-k8s-tools.sh
puts it in .tools/bin) renders it; the results are plain dicts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dreambooth-operator"
INSTALL_MANIFEST = REPO / "manifests" / "install.yaml"
DASHBOARD = REPO / "dashboards" / "dreambooth.json"
CHART_DASHBOARD = CHART / "dashboards" / "dreambooth.json"
ALERTS = REPO / "dashboards" / "alerts.yaml"
CHART_ALERTS = CHART / "dashboards" / "alerts.yaml"
TOOLS_BIN = REPO / ".tools" / "bin"

# What manifests/install.yaml is rendered as: the README's `helm install` names.
RELEASE = "dreambooth-operator"
NAMESPACE = "dreambooth-system"
KUBERNETES_VERSION = "1.35.0"

# Every optional feature of values.yaml switched on.
ALL_OPTIONS_ON = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True}},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    "podAnnotations": {"example.com/team": "ml"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {"verbose": True},
}
NAMESPACED = {**ALL_OPTIONS_ON, "watchNamespaces": ["team-a", "team-b"]}
NETWORK_POLICY_OFF = {"networkPolicy": {"enabled": False}}


def tool(name: str) -> str:
    """The project's own kubectl/helm first (pinned versions), else one on PATH."""
    candidate = TOOLS_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no `{name}` binary: run `make tools` (scripts/install-k8s-tools.sh) first")
    return found


def helm(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def template_text(values: dict[str, Any] | None = None, *extra: str) -> str:
    """`helm template` output for the given values (passed to helm on stdin)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBERNETES_VERSION]
    if values:
        args += ["--values", "-"]
    result = subprocess.run([tool("helm"), *args, *extra], input=yaml.safe_dump(values) if values else None,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"helm template exited {result.returncode}:\n{result.stderr}")
    return result.stdout


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(template_text(values)) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]
