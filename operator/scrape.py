"""Training progress from rank 0's Prometheus endpoint -> `status` fields.

The trainer's metrics are the one source of truth for progress (DESIGN.md); the
operator only copies them into status, at a bounded rate, so `kubectl get dbj` shows
them. Parsing is pure; fetching is one short HTTP GET.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from trainer.contract import (
    METRIC_CHECKPOINT_STEP,
    METRIC_ETA_SECONDS,
    METRIC_LOSS,
    METRIC_MAX_STEPS,
    METRIC_SAMPLES_PER_SECOND,
    METRIC_STEP,
    step_folder_name,
)

from .constants import METRICS_PORT_NAME

SCRAPE_TIMEOUT_SECONDS = 3.0
# Rank 0's exposition is a few KiB. The endpoint runs the job author's image, and one
# shared operator reads it: a larger answer (a compressed one inflating to gigabytes)
# is not read.
MAX_SCRAPE_BYTES = 1 << 20

# Trainer metrics -> status fields.
SCRAPED = (METRIC_STEP, METRIC_MAX_STEPS, METRIC_LOSS, METRIC_SAMPLES_PER_SECOND,
           METRIC_ETA_SECONDS, METRIC_CHECKPOINT_STEP)


def parse_metrics(text: str) -> dict[str, float]:
    """The scraped gauges by name (first sample of each; rank 0 exports one series)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SCRAPED and sample.name not in values and math.isfinite(sample.value):
                values[sample.name] = sample.value
    return values


def checkpoint_path(checkpoint_dir: str, step: int) -> str:
    return f"{checkpoint_dir}/{step_folder_name(step)}"


def progress_status(values: dict[str, float], status: dict[str, Any], checkpoint_dir: str,
                    now: str) -> dict[str, Any]:
    """Status fields that the scraped values change (an empty dict when none)."""
    fields: dict[str, Any] = {}
    if METRIC_STEP in values:
        fields["step"] = int(values[METRIC_STEP])
    if METRIC_MAX_STEPS in values and values[METRIC_MAX_STEPS] > 0:
        fields["maxSteps"] = int(values[METRIC_MAX_STEPS])
    max_steps = fields.get("maxSteps") or status.get("maxSteps")
    if "step" in fields and max_steps:
        fields["progress"] = f"{min(100, int(100 * fields['step'] / max_steps))}%"
    # Before its first step the trainer exports a loss of 0: not a loss worth showing.
    if METRIC_LOSS in values and values.get(METRIC_STEP, 0) > 0:
        fields["loss"] = round(values[METRIC_LOSS], 6)
    if METRIC_SAMPLES_PER_SECOND in values:
        fields["samplesPerSecond"] = round(values[METRIC_SAMPLES_PER_SECOND], 3)
    if METRIC_ETA_SECONDS in values:
        fields["etaSeconds"] = round(values[METRIC_ETA_SECONDS], 1)
    checkpoint_step = int(values.get(METRIC_CHECKPOINT_STEP, 0))
    previous = status.get("latestCheckpoint") or {}
    if checkpoint_step > 0 and previous.get("step") != checkpoint_step:
        fields["latestCheckpoint"] = {"step": checkpoint_step,
                                      "path": checkpoint_path(checkpoint_dir, checkpoint_step), "time": now}
        if status.get("consecutivePreemptions"):  # progress since: the next preemption starts a new run
            fields["consecutivePreemptions"] = 0
    return {key: value for key, value in fields.items() if status.get(key) != value}


def metrics_url(worker0: dict[str, Any] | None) -> str | None:
    """Rank 0 lives on worker-0 (static rendezvous). Its pod IP, which every running
    pod has, is used rather than its DNS name `<job>-worker-0.<job>`: that name only
    resolves inside the cluster, and a lookup that cannot succeed would stall. The port
    is the one the pod was made with, not the spec's: an edit of spec.metrics.port
    reaches the next gang, and the running one goes on serving where it started."""
    host = ((worker0 or {}).get("status") or {}).get("podIP")
    ports = [port for container in ((worker0 or {}).get("spec") or {}).get("containers") or []
             for port in container.get("ports") or [] if port.get("name") == METRICS_PORT_NAME]
    if not host or not ports:
        return None
    port = ports[0]["containerPort"]
    if ":" in host:  # an IPv6 pod IP (IPv6-only and IPv6-first dual-stack clusters) goes in brackets
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def scrape_session() -> aiohttp.ClientSession:
    """What scrape() asks through: nothing compressed (a small answer must stay small)."""
    return aiohttp.ClientSession(auto_decompress=False, headers={"Accept-Encoding": "identity"})


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """The values at `url`, or None when rank 0 does not answer (yet), or answers with
    anything but a small plain exposition. A redirect is not followed: the operator would
    fetch, from where it runs, whatever address the job's image names."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS),
                               allow_redirects=False) as response:
            if response.status != 200 or response.headers.get("Content-Encoding", "identity") != "identity":
                return None
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_SCRAPE_BYTES:
                    return None
            return parse_metrics(body.decode("utf-8"))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
