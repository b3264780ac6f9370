"""The operator process's life, around kopf.

/healthz and /metrics answer from the start, a standby's too: it is alive and healthy,
and a rolling update waits for the new pod to be ready while the old one still leads.
With leader election, kopf starts only once this process holds the Lease, so no handler
or daemon runs on a standby. A clean stop (SIGTERM, SIGINT) stops kopf first, its
daemons included, and then releases the Lease, so a standby takes over in about a retry
period. A leader that loses the Lease exits at once, with EXIT_LEADERSHIP_LOST, without
kopf's graceful stop: a job's loop must not take one more step while another operator
may already act on the job (controller-runtime exits the same way); the pod restarts
and stands by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import kopf

from .health import start_http
from .kube import load_client_config
from .leader import ElectionConfig, LeaderElector, elector_for
from .opmetrics import OperatorMetrics
from .settings import OperatorConfig

logger = logging.getLogger(__name__)

EXIT_LEADERSHIP_LOST = 1


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


async def run(config: OperatorConfig, *, namespaces: list[str], election: ElectionConfig | None) -> None:
    """Serve /healthz and /metrics, wait for the Lease (with `election`), run kopf."""
    metrics = OperatorMetrics()
    memo = kopf.Memo(config=config, metrics=metrics)

    def stuck_jobs() -> list[str]:
        reconciler = memo.get("reconciler")  # built by the startup handler, once leading
        return reconciler.stuck_jobs() if reconciler is not None else []

    http = await start_http(metrics, config.http_host, config.http_port, stuck_jobs) if config.http_port else None
    stop = asyncio.Event()
    stop_on_signals(stop)
    elector = elector_for(load_client_config(config.kubeconfig), election) if election else None
    try:
        if elector is not None and not await elector.acquire(stop):
            return  # stopped while standing by
        metrics.leader.set(1)
        await lead(memo, namespaces, stop, elector)
    finally:
        if elector is not None:
            elector.api.close()
        if http is not None:
            await http.cleanup()


async def lead(memo: kopf.Memo, namespaces: list[str], stop: asyncio.Event, elector: LeaderElector | None) -> None:
    # Both created before kopf, which cancels, at its end, every task created after its start.
    renewing = asyncio.create_task(elector.keep_renewing()) if elector is not None else None
    # kopf takes SIGTERM and SIGINT over once it runs; a signal before that sets `stop`.
    # (Not passed as kopf's stop_flag: kopf then leaves its waiter on it pending at a
    # signal and waits 5 s for that "hung" task before it returns.)
    stopped = asyncio.create_task(stop.wait())
    operator = asyncio.create_task(kopf.operator(
        # No kopf peering: the Lease decides who runs (leader.py says why).
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        memo=memo,
    ))
    try:
        await asyncio.wait({task for task in (operator, renewing, stopped) if task is not None},
                           return_when=asyncio.FIRST_COMPLETED)
        if renewing is not None and renewing.done():
            exit_lost(renewing.exception())
        if not operator.done():  # the signal came before kopf took the handlers
            operator.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await operator
    finally:
        stopped.cancel()
        if renewing is not None:
            renewing.cancel()
            stop_on_signals(stop)  # kopf's handlers outlive it, pointing at its finished flag
            await elector.release()


def exit_lost(error: BaseException | None) -> None:
    logger.critical("Leader election: lost the Lease (%s); exiting at once so that only the new leader acts "
                    "on jobs", error)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_LEADERSHIP_LOST)
