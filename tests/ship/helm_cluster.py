"""The emulated API (tests/operator/emulated_cluster.py) extended with what a `helm
install` of the chart touches: the kinds the chart creates, and a server version the
chart's kubeVersion accepts (kmock reports v1.26; the chart needs 1.30+)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kmock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # its siblings import by plain name
from emulated_cluster import ALL_VERBS, RESOURCES, EmulatedCluster, Emulator, ResourceInfo  # noqa: E402

from tests.ship.chart import KUBERNETES_VERSION  # noqa: E402

CHART_RESOURCES = [
    ("v1/serviceaccounts", "ServiceAccount", True, ["sa"], []),
    ("apps/v1/deployments", "Deployment", True, ["deploy"], ["status", "scale"]),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True, ["pdb"], ["status"]),
    ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False, [], []),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False, [], []),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True, [], []),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True, [], []),
]


class ChartEmulator(Emulator):
    async def _serve_server_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_server_version(request)
        major, minor, _ = KUBERNETES_VERSION.split(".")
        return {**result, "major": major, "minor": minor, "gitVersion": f"v{KUBERNETES_VERSION}"}


class ChartCluster(EmulatedCluster):
    async def _main(self) -> None:
        import asyncio

        self._stop = asyncio.Event()
        emulator = ChartEmulator()
        for key, kind, namespaced, short, subresources in [*RESOURCES, *CHART_RESOURCES]:
            emulator.resources[key] = ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                                   verbs=ALL_VERBS, shortnames=short, subresources=subresources)
        async with emulator, kmock.Server(emulator, host="127.0.0.1", port=self.port):
            self._ready.set()
            await self._stop.wait()
