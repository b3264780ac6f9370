"""Progress from rank 0's metrics: the operator's parser against the trainer's own
metrics module (the contract of DESIGN.md "Metrics"), and the status fields it yields."""

from __future__ import annotations

import asyncio
import copy
import gzip
import math
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from dbj_examples import MINIMAL_SPEC, job_body
from prometheus_client import generate_latest, start_http_server

from dreambooth_operator.pods import build_worker_pod
from dreambooth_operator.scrape import (
    MAX_SCRAPE_BYTES,
    metrics_url,
    parse_metrics,
    progress_status,
    scrape,
    scrape_session,
)
from dreambooth_operator.spec import Job
from trainer.metrics import TrainerMetrics

NOW = "2026-06-01T12:00:00Z"


def trainer_exposition(step: int = 42, checkpoint_step: int = 40, eta: float = 8.0) -> str:
    metrics = TrainerMetrics(max_steps=100, labels={"job": "sks-dog", "namespace": "default"})
    metrics.record_position(step=step, samples=2 * step)
    metrics.record_values({"loss": 0.125, "instance_loss": 0.1, "prior_loss": 0.025, "learning_rate": 2e-6,
                           "samples_per_second": 12.5, "eta_seconds": eta})
    if checkpoint_step:
        metrics.record_checkpoint(step=checkpoint_step, seconds=1.5)
    return generate_latest(metrics.registry).decode()


def test_the_trainers_own_endpoint_becomes_status_fields() -> None:
    values = parse_metrics(trainer_exposition())
    fields = progress_status(values, {}, "/mnt/storage/sks-dog/checkpoints", NOW)
    assert fields == {
        "step": 42,
        "maxSteps": 100,
        "progress": "42%",
        "loss": 0.125,
        "samplesPerSecond": 12.5,
        "etaSeconds": 8.0,
        "latestCheckpoint": {"step": 40, "path": "/mnt/storage/sks-dog/checkpoints/step-00000040", "time": NOW},
    }


def test_unknown_values_are_left_out_and_unchanged_fields_are_not_patched() -> None:
    values = parse_metrics(trainer_exposition(checkpoint_step=0, eta=math.nan))
    assert "dreambooth_eta_seconds" not in values  # NaN until the trainer knows
    fields = progress_status(values, {}, "/c", NOW)
    assert "etaSeconds" not in fields and "latestCheckpoint" not in fields
    again = progress_status(values, {**fields}, "/c", NOW)
    assert again == {}


def test_no_loss_is_shown_before_the_first_step() -> None:
    before = progress_status({"dreambooth_step": 0.0, "dreambooth_loss": 0.0}, {}, "/c", NOW)
    assert before["step"] == 0 and "loss" not in before
    after = progress_status({"dreambooth_step": 1.0, "dreambooth_loss": 0.25}, before, "/c", NOW)
    assert after["loss"] == 0.25


def test_checkpoint_time_is_kept_while_the_checkpoint_is_the_same() -> None:
    values = parse_metrics(trainer_exposition())
    status = {"latestCheckpoint": {"step": 40, "path": "/c/step-00000040", "time": "earlier"}}
    assert "latestCheckpoint" not in progress_status(values, status, "/c", NOW)


def worker0(pod_ip: str | None, port: int = 9090) -> dict[str, Any]:
    """Worker-0 as the operator builds it for a spec with this metrics port, and its pod IP."""
    spec = {**copy.deepcopy(MINIMAL_SPEC), "metrics": {"port": port}}
    pod = build_worker_pod(Job.from_body(job_body("sks-dog", spec)), 0, 0, "h")
    pod["status"] = {"podIP": pod_ip} if pod_ip else {}
    return pod


def test_rank0_is_scraped_at_worker0s_pod_ip_on_the_port_worker0_was_made_with() -> None:
    assert metrics_url(worker0("10.0.0.7")) == "http://10.0.0.7:9090/metrics"
    assert metrics_url(worker0("10.0.0.7", port=9100)) == "http://10.0.0.7:9100/metrics"
    assert metrics_url(worker0("10.0.0.7", port=0)) is None  # a gang started without the endpoint
    assert metrics_url(worker0(None)) is None
    assert metrics_url(None) is None


def test_an_ipv6_pod_ip_is_scraped_in_brackets() -> None:
    # IPv6-only and IPv6-first dual-stack clusters give pods IPv6 addresses: without the
    # brackets the URL does not parse, and no progress ever reached status.
    assert metrics_url(worker0("fd00:10:244::5")) == "http://[fd00:10:244::5]:9090/metrics"
    metrics = TrainerMetrics(max_steps=100, labels={})
    metrics.record_position(step=42, samples=84)
    server, thread = start_http_server(0, addr="::1", registry=metrics.registry)
    try:
        async def scraped() -> dict[str, float] | None:
            async with scrape_session() as session:
                return await scrape(session, metrics_url(worker0("::1", port=server.server_port)))

        assert asyncio.run(scraped())["dreambooth_step"] == 42
    finally:
        server.shutdown()
        thread.join()


def test_a_new_checkpoint_ends_a_run_of_preemptions() -> None:
    values = parse_metrics(trainer_exposition())  # checkpoint 40
    resumed_where_it_was = {"latestCheckpoint": {"step": 40}, "consecutivePreemptions": 2}
    assert "consecutivePreemptions" not in progress_status(values, resumed_where_it_was, "/c", NOW)
    progressed = {"latestCheckpoint": {"step": 20}, "consecutivePreemptions": 2}
    assert progress_status(values, progressed, "/c", NOW)["consecutivePreemptions"] == 0


def test_only_a_small_plain_answer_from_rank_0_is_read() -> None:
    # Rank 0 runs the job author's image, and one operator serves every tenant: a
    # compressed bomb, a huge body or a redirect to an address only the operator reaches
    # must give nothing (and take neither its memory nor its network position).
    exposition = trainer_exposition()
    bomb = gzip.compress(b"#" * (64 * MAX_SCRAPE_BYTES))

    async def plain(_: web.Request) -> web.Response:
        return web.Response(text=exposition)

    async def compressed(_: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    async def huge(_: web.Request) -> web.Response:
        return web.Response(text=exposition + "#" * (MAX_SCRAPE_BYTES + 1))

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/metrics")

    async def scenario() -> dict[str, object]:
        app = web.Application()
        for path, handler in {"/metrics": plain, "/bomb": compressed, "/huge": huge, "/redirect": redirect}.items():
            app.router.add_get(path, handler)
        server = TestServer(app)
        await server.start_server()
        try:
            async with scrape_session() as session:
                return {path: await scrape(session, str(server.make_url(path)))
                        for path in ("/metrics", "/bomb", "/huge", "/redirect")}
        finally:
            await server.close()

    results = asyncio.run(scenario())
    assert results["/metrics"] == parse_metrics(exposition) and results["/metrics"]["dreambooth_step"] == 42
    assert results["/bomb"] is None and results["/huge"] is None and results["/redirect"] is None
