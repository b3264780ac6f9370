"""Control-plane benchmark (not a test): 100 DreamboothJobs created at once.

Starts the emulated Kubernetes API of the operator tests and the real operator
(`python -m dreambooth_operator`), creates N jobs of `--nodes` workers each as fast as
the API takes them, and reports:
  - seconds until every job's worker pods exist (and the rate);
  - the operator's reconcile latency, from its own dreambooth_operator_reconcile_seconds
    histogram (mean, and the bucket bounds holding p50/p99).

    .venv/bin/python benchmarks/operator_100_jobs.py [--jobs 100] [--nodes 2] [--json out.json]

The emulated API runs in this process and shares the CPU with the operator, so the
figures are an upper bound on what the operator itself costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from dbj_examples import MINIMAL_SPEC  # noqa: E402
from emulated_cluster import EmulatedCluster  # noqa: E402
from operator_harness import Cluster, OperatorProcess  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def histogram(text: str, name: str) -> tuple[float, float, list[tuple[float, float]]]:
    total = count = 0.0
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total = sample.value
            elif sample.name == f"{name}_count":
                count = sample.value
            elif sample.name == f"{name}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    return total, count, sorted(buckets)


def quantile_bound(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """Upper bound of the bucket holding quantile q."""
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    emulated = EmulatedCluster(workdir).start()
    # Production resync (the tests' fast timings would add a pass per job every 2 s).
    operator = OperatorProcess(emulated, workdir, extra_args=["--resync-seconds", "30"]).start()
    cluster = Cluster(emulated)
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["workers"]["nodes"] = args.nodes
    expected = args.jobs * args.nodes
    try:
        started = time.perf_counter()
        for index in range(args.jobs):
            cluster.create_job(f"bench-{index:03d}", spec)
        submitted = time.perf_counter() - started
        pods = 0
        while time.perf_counter() - started < args.timeout:
            pods = sum(1 for p in cluster.all_pods() if p["metadata"]["name"].startswith("bench-"))
            if pods >= expected:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        total, count, buckets = histogram(operator.metrics(), "dreambooth_operator_reconcile_seconds")
    finally:
        operator.stop()
        emulated.stop()

    results = {
        "jobs": args.jobs,
        "nodes_per_job": args.nodes,
        "pods_expected": expected,
        "pods_created": pods,
        "seconds_to_submit_jobs": round(submitted, 2),
        "seconds_until_all_pods_exist": round(elapsed, 2),
        "pods_per_second": round(pods / elapsed, 1),
        "reconciles": int(count),
        "reconcile_mean_seconds": round(total / count, 4) if count else None,
        "reconcile_p50_le_seconds": quantile_bound(buckets, count, 0.5),
        "reconcile_p99_le_seconds": quantile_bound(buckets, count, 0.99),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if pods < expected:
        sys.exit(f"only {pods} of {expected} pods after {args.timeout}s")


if __name__ == "__main__":
    main()
