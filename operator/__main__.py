"""`python -m dreambooth_operator`: run the DreamboothJob controller.

Connects with the in-cluster service account, else KUBECONFIG (or ~/.kube/config).
With --leader-elect (the chart passes it), it acts only while it holds the Lease
`dreambooth-operator-leader` in its own namespace; other replicas stand by.
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
from .leader import ElectionConfig, default_identity, default_namespace
from .running import run
from .settings import OperatorConfig, ReconcilerSettings, Timing

ELECTION_DEFAULTS = ElectionConfig(namespace="", identity="")


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
                        help="seconds a worker may stay unscheduled before the job gets an Unschedulable condition "
                             "(and an elastic gang, spec.workers.minNodes, goes on without it)")
    parser.add_argument("--start-timeout", type=float, default=Timing.start_timeout_seconds,
                        help="seconds a scheduled worker's container may fail to start (image pull, missing Secret) "
                             "before the job fails and its pods free their nodes; a worker still creating its "
                             "containers (a volume that cannot mount) is reported this long after it was scheduled "
                             "and fails the job this long after that")
    parser.add_argument("--scrape-interval", type=float, default=ReconcilerSettings.scrape_interval_seconds,
                        help="seconds between scrapes of rank 0's metrics per job")
    parser.add_argument("--resync-seconds", type=float, default=Timing.resync_seconds,
                        help="seconds between checks of a job that nothing woke up")
    parser.add_argument("--crd-recheck-seconds", type=float, default=ReconcilerSettings.crd_recheck_seconds,
                        help="seconds between checks that the installed DreamboothJob CRD has every spec field this "
                             "operator reads and status field it writes")
    parser.add_argument("--network-policy", action=argparse.BooleanOptionalAction,
                        default=ReconcilerSettings.network_policy,
                        help="give each job a NetworkPolicy that admits only its own workers and scrapes of its "
                             "metrics port (default: on); --no-network-policy where the cluster's admins manage "
                             "policies themselves")
    election = parser.add_argument_group("leader election (for 2+ replicas; see operator/README.md)")
    election.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=False,
                          help="act only while holding the Lease dreambooth-operator-leader, so that of several "
                               "operators one acts and the others stand by (default: off for a run by hand; "
                               "the chart turns it on)")
    election.add_argument("--leader-election-namespace", default=None,
                          help="namespace of the Lease (default: the pod's own, from $POD_NAMESPACE or the "
                               "service account)")
    election.add_argument("--leader-election-lease-duration", type=int,
                          default=ELECTION_DEFAULTS.lease_duration_seconds,
                          help="whole seconds after which a standby takes over a Lease its holder stopped renewing")
    election.add_argument("--leader-election-renew-deadline", type=float,
                          default=ELECTION_DEFAULTS.renew_deadline_seconds,
                          help="seconds the leader may fail to renew before it exits (shorter than the lease duration)")
    election.add_argument("--leader-election-retry-period", type=float,
                          default=ELECTION_DEFAULTS.retry_period_seconds,
                          help="seconds between the leader's renewals and a standby's looks")
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    timing = Timing(backoff_base_seconds=args.backoff_seconds, backoff_max_seconds=args.backoff_max_seconds,
                    pending_timeout_seconds=args.pending_timeout, start_timeout_seconds=args.start_timeout,
                    resync_seconds=args.resync_seconds)
    settings = ReconcilerSettings(timing=timing, scrape_interval_seconds=args.scrape_interval,
                                  network_policy=args.network_policy, crd_recheck_seconds=args.crd_recheck_seconds)
    return OperatorConfig(settings=settings,
                          http_host=args.http_host, http_port=args.http_port, kubeconfig=args.kubeconfig)


def election_from_args(args: argparse.Namespace) -> ElectionConfig | None:
    """The election's settings (None without --leader-elect); ValueError names the flag to fix."""
    if not args.leader_elect:
        return None
    namespace = args.leader_election_namespace or default_namespace()
    if not namespace:
        raise ValueError("--leader-elect needs the Lease's namespace: not in a pod (no $POD_NAMESPACE, no service "
                         "account), so pass --leader-election-namespace NAMESPACE, e.g. the installed "
                         "operator's dreambooth-system to stand by behind it")
    return ElectionConfig(namespace=namespace, identity=default_identity(),
                          lease_duration_seconds=args.leader_election_lease_duration,
                          renew_deadline_seconds=args.leader_election_renew_deadline,
                          retry_period_seconds=args.leader_election_retry_period)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        election = election_from_args(args)
    except ValueError as error:
        sys.exit(f"dreambooth-operator: {error}")
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
    asyncio.run(run(config_from_args(args), namespaces=args.namespace, election=election))


if __name__ == "__main__":
    main()
