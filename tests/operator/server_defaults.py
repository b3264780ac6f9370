"""What a real API server fills into a Service it stores (its defaulting and IP
allocation) and a client never sent. The emulator adds it, so that a test sees the
operator compare only the fields it builds: a Service read back is not the one sent."""

from __future__ import annotations

from typing import Any


def default_service(service: dict[str, Any]) -> None:
    """As Kubernetes 1.35 defaults a single-stack IPv4 cluster's Service on create."""
    spec = service.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("clusterIP", "10.96.0.10")  # an allocated IP; a headless one keeps "None"
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
