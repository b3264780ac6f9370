"""HTTP endpoints of the operator: liveness `/healthz` and Prometheus `/metrics`."""

from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .opmetrics import OperatorMetrics


def build_app(metrics: OperatorMetrics, stuck_jobs: Callable[[], list[str]] = list) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering proves the event loop is alive; a job's reconcile pass that never
        # ends (a call the API client cannot time out) is as dead to that job, and a
        # restart is what cures it.
        stuck = stuck_jobs()
        if stuck:
            return web.Response(status=503, text=f"reconcile passes stuck: {', '.join(stuck)}\n")
        return web.Response(text="ok\n")

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", serve_metrics)
    return app


async def start_http(metrics: OperatorMetrics, host: str, port: int,
                     stuck_jobs: Callable[[], list[str]] = list) -> web.AppRunner:
    runner = web.AppRunner(build_app(metrics, stuck_jobs), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
