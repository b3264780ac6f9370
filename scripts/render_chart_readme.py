"""Writes charts/dreambooth-operator/README.md (what `helm show readme` prints) with the
chart's values table, from values.yaml: each key's default, and the comment above it.

    python scripts/render_chart_readme.py          # rewrite the chart's README.md
    python scripts/render_chart_readme.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.reference_doc import cell, write_or_check  # noqa: E402

CHART = REPO / "charts" / "dreambooth-operator"
TARGET = CHART / "README.md"
KEY_LINE = re.compile(r"(?P<indent> *)(?P<key>[A-Za-z][\w-]*):")


def comments_by_key(text: str) -> dict[str, str]:
    """Dotted key -> the comment lines right above it (a blank line ends a comment)."""
    described: dict[str, str] = {}
    parents: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match is not None:
            indent = len(match["indent"])
            parents = [(i, key) for i, key in parents if i < indent] + [(indent, match["key"])]
            if comment:
                described[".".join(key for _, key in parents)] = " ".join(comment)
        comment = []
    return described


def rows(values: dict[str, Any], described: dict[str, str], path: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, default, meaning) of each section that has a comment and of each value."""
    for key, value in values.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict) and value:
            if dotted in described:
                yield dotted, "", described[dotted]
            yield from rows(value, described, f"{dotted}.")
        else:
            yield dotted, f"`{json.dumps(value)}`", described.get(dotted, "")


def render() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    lines = [
        f"# {chart['name']} {chart['version']}",
        "",
        f"{chart['description']}. Kubernetes {chart['kubeVersion'].removeprefix('>=').removesuffix('-0')} or newer.",
        "",
        "```sh",
        f"helm install {chart['name']} charts/{chart['name']} -n dreambooth-system --create-namespace",
        "kubectl apply -f manifests/examples/tiny-cpu-job.yaml   # after: kubectl create configmap robot-photos "
        "--from-file=examples/instance-images/",
        "```",
        "",
        "`helm upgrade` never updates the CRD: apply `crds/crd.yaml` first. The repository's README.md "
        "(\"Install on a cluster\") and operator/README.md tell the rest; every field of a DreamboothJob is in "
        "docs/dreamboothjob.md.",
        "",
        "## Values",
        "",
        f"Generated from values.yaml by `scripts/render_chart_readme.py`; do not edit by hand. "
        f"values.schema.json checks every key.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        *[f"| `{key}` | {cell(default)} | {cell(meaning)} |"
          for key, default, meaning in rows(yaml.safe_load(text), comments_by_key(text))],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(write_or_check(TARGET, render(), sys.argv))
