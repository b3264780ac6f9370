"""`python -m dreambooth_operator`: run the DreamboothJob controller.

Connects with the in-cluster service account, else KUBECONFIG (or ~/.kube/config).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kopf
import kubernetes

from . import handlers  # noqa: F401  (registers the handlers)
from .kube import load_client_config
from .settings import OperatorConfig, ReconcilerSettings, Timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    parser.add_argument("--http-host", default=OperatorConfig.http_host, help="address of /healthz and /metrics")
    parser.add_argument("--http-port", type=int, default=OperatorConfig.http_port,
                        help="port of /healthz and /metrics (0 disables)")
    parser.add_argument("--backoff-seconds", type=float, default=Timing.backoff_base_seconds,
                        help="delay before the first gang restart after a failure; doubles each time")
    parser.add_argument("--backoff-max-seconds", type=float, default=Timing.backoff_max_seconds,
                        help="cap of the restart delay")
    parser.add_argument("--pending-timeout", type=float, default=Timing.pending_timeout_seconds,
                        help="seconds a worker may stay unscheduled before the job gets an Unschedulable condition")
    parser.add_argument("--start-timeout", type=float, default=Timing.start_timeout_seconds,
                        help="seconds a scheduled worker's container may fail to start (image pull, missing Secret) "
                             "before the job fails and its pods free their nodes; a worker still creating its "
                             "containers (a volume that cannot mount) is reported this long after it was scheduled "
                             "and fails the job this long after that")
    parser.add_argument("--scrape-interval", type=float, default=ReconcilerSettings.scrape_interval_seconds,
                        help="seconds between scrapes of rank 0's metrics per job")
    parser.add_argument("--resync-seconds", type=float, default=Timing.resync_seconds,
                        help="seconds between checks of a job that nothing woke up")
    parser.add_argument("--network-policy", action=argparse.BooleanOptionalAction,
                        default=ReconcilerSettings.network_policy,
                        help="give each job a NetworkPolicy that admits only its own workers and scrapes of its "
                             "metrics port (default: on); --no-network-policy where the cluster's admins manage "
                             "policies themselves")
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    timing = Timing(backoff_base_seconds=args.backoff_seconds, backoff_max_seconds=args.backoff_max_seconds,
                    pending_timeout_seconds=args.pending_timeout, start_timeout_seconds=args.start_timeout,
                    resync_seconds=args.resync_seconds)
    settings = ReconcilerSettings(timing=timing, scrape_interval_seconds=args.scrape_interval,
                                  network_policy=args.network_policy)
    return OperatorConfig(settings=settings,
                          http_host=args.http_host, http_port=args.http_port, kubeconfig=args.kubeconfig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.kubeconfig:
        # kopf's own login reads $KUBECONFIG; the operator's client gets the path directly.
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        load_client_config(args.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as error:
        reason = str(error).rstrip(".")
        sys.exit(f"dreambooth-operator: no cluster to talk to: {reason}. Run it in a pod (in-cluster "
                 "service account), or pass --kubeconfig FILE / set KUBECONFIG.")
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(
        standalone=True,  # one replica; no KopfPeering resource needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        memo=kopf.Memo(config=config_from_args(args)),
    ))


if __name__ == "__main__":
    main()
