"""manifests/install.yaml is `helm template` of the chart with its defaults, under a
header telling how to apply it. Regenerate after a chart change:

    python -m tests.ship.install_manifest
"""

from __future__ import annotations

from tests.ship.chart import INSTALL_MANIFEST, NAMESPACE, RELEASE, template_text

HEADER = f"""\
# The operator without Helm. Generated, do not edit: this is
#   helm template {RELEASE} charts/dreambooth-operator --namespace {NAMESPACE}
# (the chart's defaults; regenerate with `python -m tests.ship.install_manifest`).
# Install:
#   kubectl create namespace {NAMESPACE}
#   kubectl apply -f manifests/crd.yaml
#   kubectl apply -f manifests/install.yaml
"""


def render_install_manifest() -> str:
    return HEADER + template_text()


if __name__ == "__main__":
    INSTALL_MANIFEST.write_text(render_install_manifest())
    print(f"wrote {INSTALL_MANIFEST}")
