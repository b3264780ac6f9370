"""kopf handlers: each only wires an event to the reconciler.

The operator-wide objects (API client, reconciler) are built in the startup handler from
the `OperatorConfig` and the metrics that running.py puts into kopf's memo; kopf, and so
every handler here, runs only while this process leads (running.py).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .constants import GROUP, LABEL_JOB, PLURAL, VERSION
from .kube import Forbidden, KubeApi, connection_info, load_client_config
from .opmetrics import OperatorMetrics
from .reconciler import Reconciler
from .settings import OperatorConfig

# (group, version, plural) of the DreamboothJob resource, as kopf decorators take it.
JOBS = (GROUP, VERSION, PLURAL)


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's watches use the same credentials as the operator's own client (the
    --kubeconfig given on the command line, else in-cluster, else $KUBECONFIG)."""
    config: OperatorConfig = memo.get("config") or OperatorConfig()
    return connection_info(load_client_config(config.kubeconfig))


@kopf.on.startup()
async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    config: OperatorConfig = memo.get("config") or OperatorConfig()
    configure_kopf(settings)
    memo.metrics = memo.get("metrics") or OperatorMetrics()
    memo.api = KubeApi(load_client_config(config.kubeconfig))
    memo.reconciler = Reconciler(memo.api, memo.metrics, config.settings)
    await memo.reconciler.check_crd()


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    # kopf's bookkeeping goes to annotations, leaving `status` to the job's own fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Holds a deleted job until its children are removed (see job_deleted).
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Only worker pods, filtered by the API server: the handler's own label filter runs
    # in the operator, after every pod of the cluster was listed and streamed to it.
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB
    settings.networking.request_timeout = 30


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("reconciler") is not None:
        await memo.reconciler.close()
        memo.api.close()


@kopf.daemon(*JOBS, cancellation_timeout=5.0)
async def run_job(name: str, namespace: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Each job's reconcile loop, for as long as the job exists (restarted on resume)."""
    await memo.reconciler.run(namespace, name, stopped)


# Event handlers are async on purpose: sync ones would queue in kopf's small thread pool.
@kopf.on.event(*JOBS)
async def job_changed(name: str, namespace: str, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    # Only a new spec (generation) or a deletion is news to the job's loop; its own
    # status patches come back here too and would wake it for nothing.
    change = (meta.get("generation"), bool(meta.get("deletionTimestamp")))
    memo.reconciler.wakeups.poke_if_changed(namespace, name, change)


@kopf.on.event("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def worker_changed(labels: dict[str, str], namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.wakeups.poke(namespace, labels[LABEL_JOB])


@kopf.on.delete(*JOBS)
async def job_deleted(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        await memo.reconciler.cleanup(namespace, name, dict(body))
    except Forbidden as error:
        # kopf keeps the finalizer, puts this on the job as an Event, and tries again.
        raise kopf.TemporaryError(f"cannot delete the job's pods and children: {error}", delay=30) from None
