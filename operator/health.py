"""HTTP endpoints of the operator: liveness `/healthz` and Prometheus `/metrics`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .opmetrics import OperatorMetrics


def build_app(metrics: OperatorMetrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive, which is what liveness asks.
        return web.Response(text="ok\n")

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", serve_metrics)
    return app


async def start_http(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
