"""Leader election (operator/leader.py, operator/running.py): the decision as data, the
Lease calls against the emulated API (its replace is conditional on resourceVersion, as
an API server's), a leader that cannot renew, and real operator processes racing for
one Lease: one acts, the other stands by and takes over when the leader stops or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import signal
import socket
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import kubernetes
import pytest
from dbj_examples import MINIMAL_SPEC
from emulated_cluster import EmulatedCluster, free_port
from operator_harness import Cluster, OperatorProcess, gang_of, pods_created, terminated, wait_for

from dreambooth_operator.__main__ import election_from_args, parse_args
from dreambooth_operator.kube import load_client_config
from dreambooth_operator.leader import (
    LEASE_NAME,
    Action,
    ElectionConfig,
    LeadershipLost,
    Sighting,
    decide,
    elector_for,
    lease_record,
    released_lease,
    written_lease,
)

pytestmark = pytest.mark.timeout(120)

ME, OTHER = "op-a_1234", "op-b_5678"
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def lease(holder: str | None, duration: int = 15, renewed: str = "2026-06-01T11:00:00.000000Z",
          version: str = "7") -> dict[str, Any]:
    spec = {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renewed,
            "acquireTime": "2026-06-01T10:00:00.000000Z", "leaseTransitions": 2}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": "ops", "resourceVersion": version}, "spec": spec}


def seen_at(since: float, the_lease: dict[str, Any]) -> Sighting:
    return Sighting(lease_record(the_lease), since)


@pytest.mark.parametrize("the_lease, now, seen, action", [
    pytest.param(None, 100.0, None, Action.CREATE, id="no-lease-yet"),
    pytest.param(lease(ME), 100.0, None, Action.RENEW, id="mine"),
    pytest.param(lease(None, duration=1), 100.0, None, Action.ACQUIRE, id="released"),
    # A renewTime an hour old on the holder's clock says nothing: the clocks may disagree.
    pytest.param(lease(OTHER), 100.0, None, Action.WAIT, id="first-sight-of-another-holder"),
    pytest.param(lease(OTHER), 114.9, seen_at(100.0, lease(OTHER)), Action.WAIT, id="not-renewed-for-14.9s"),
    pytest.param(lease(OTHER), 115.0, seen_at(100.0, lease(OTHER)), Action.ACQUIRE, id="not-renewed-for-15s"),
    pytest.param(lease(OTHER, duration=3), 103.0, seen_at(100.0, lease(OTHER, duration=3)), Action.ACQUIRE,
                 id="the-holders-duration-counts"),
    pytest.param(lease(OTHER, renewed="2026-06-01T11:00:02.000000Z"), 130.0, seen_at(100.0, lease(OTHER)),
                 Action.WAIT, id="renewed-since-last-look"),
])
def test_decision(the_lease: dict[str, Any] | None, now: float, seen: Sighting | None, action: Action) -> None:
    assert decide(the_lease, ME, now, seen).action is action


def test_a_changed_record_restarts_the_count_and_an_unchanged_one_keeps_it() -> None:
    first = decide(lease(OTHER), ME, 100.0, None).seen
    assert decide(lease(OTHER), ME, 110.0, first).seen == first
    renewed = lease(OTHER, renewed="2026-06-01T11:00:02.000000Z")
    assert decide(renewed, ME, 110.0, first).seen == Sighting(lease_record(renewed), 110.0)


def test_written_leases() -> None:
    config = ElectionConfig(namespace="ops", identity=ME, lease_duration_seconds=20)
    created = written_lease(config, None, Action.CREATE, T0)
    assert created["metadata"] == {"name": LEASE_NAME, "namespace": "ops"}
    assert created["spec"] == {"holderIdentity": ME, "leaseDurationSeconds": 20, "leaseTransitions": 0,
                               "acquireTime": "2026-06-01T12:00:00.000000Z",
                               "renewTime": "2026-06-01T12:00:00.000000Z"}
    taken = written_lease(config, lease(OTHER), Action.ACQUIRE, T0)
    # The resourceVersion read makes the replace conditional: of two takers, one wins.
    assert taken["metadata"]["resourceVersion"] == "7"
    assert taken["spec"]["holderIdentity"] == ME and taken["spec"]["leaseTransitions"] == 3
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == "2026-06-01T12:00:00.000000Z"
    renewed = written_lease(config, lease(ME), Action.RENEW, T0)
    assert renewed["spec"]["acquireTime"] == "2026-06-01T10:00:00.000000Z"
    assert renewed["spec"]["leaseTransitions"] == 2 and renewed["spec"]["renewTime"] == "2026-06-01T12:00:00.000000Z"
    released = released_lease(lease(ME), T0)
    assert released["spec"]["holderIdentity"] is None and released["spec"]["leaseDurationSeconds"] == 1
    assert decide(released, OTHER, 0.0, None).action is Action.ACQUIRE


@pytest.mark.parametrize("times, flag", [
    ({"lease_duration_seconds": 10, "renew_deadline_seconds": 10}, "--leader-election-lease-duration 10"),
    ({"renew_deadline_seconds": 2, "retry_period_seconds": 2}, "--leader-election-renew-deadline 2"),
    ({"retry_period_seconds": 0}, "--leader-election-retry-period 0"),
])
def test_timings_that_cannot_work_are_refused_naming_the_flag(times: dict[str, float], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ElectionConfig(namespace="ops", identity=ME, **times)


def test_election_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert election_from_args(parse_args([])) is None  # a run by hand: off unless asked
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ValueError, match="pass --leader-election-namespace"):
        election_from_args(parse_args(["--leader-elect"]))
    monkeypatch.setenv("POD_NAMESPACE", "dreambooth-system")
    monkeypatch.setenv("POD_NAME", "dreambooth-operator-7f9c-x2x")
    election = election_from_args(parse_args(["--leader-elect"]))
    assert election.namespace == "dreambooth-system" and election.name == LEASE_NAME
    assert election.identity.startswith("dreambooth-operator-7f9c-x2x_")
    assert election.identity != election_from_args(parse_args(["--leader-elect"])).identity
    assert (election.lease_duration_seconds, election.renew_deadline_seconds, election.retry_period_seconds) == (
        15, 10, 2)


@pytest.fixture
def emulated(tmp_path: Path) -> Iterator[EmulatedCluster]:
    """A cluster of each test's own: its operators, Lease and jobs meet no other test's."""
    cluster = EmulatedCluster(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    yield cluster.start()
    cluster.stop()


def test_of_two_writers_from_one_read_the_second_gets_409(emulated: EmulatedCluster) -> None:
    async def race() -> list[Any]:
        config = ElectionConfig(namespace="default", identity=ME)
        api = elector_for(load_client_config(str(emulated.kubeconfig)), config).api
        try:
            created = await api.create_lease(written_lease(config, None, Action.CREATE, T0))
            assert await api.create_lease(written_lease(config, None, Action.CREATE, T0)) is None
            other = ElectionConfig(namespace="default", identity=OTHER)
            first = await api.replace_lease(written_lease(other, created, Action.ACQUIRE, T0))
            second = await api.replace_lease(written_lease(config, created, Action.ACQUIRE, T0))
            return [first, second, await api.get_lease("default", LEASE_NAME)]
        finally:
            api.close()

    first, second, stored = asyncio.run(race())
    assert first["spec"]["holderIdentity"] == OTHER and second is None
    assert stored["spec"]["holderIdentity"] == OTHER
    assert stored["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


@contextlib.contextmanager
def unanswering_server() -> Iterator[str]:
    """A kubeconfig's server that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("server", ["refused", "unanswering"])
def test_a_leader_that_cannot_renew_gives_up_at_the_renew_deadline(server: str, tmp_path: Path) -> None:
    config = ElectionConfig(namespace="default", identity=ME, lease_duration_seconds=2,
                            renew_deadline_seconds=1.0, retry_period_seconds=0.2)

    async def renew(url: str) -> float:
        configuration = kubernetes.client.Configuration()
        configuration.host = url
        elector = elector_for(configuration, config)
        start = time.monotonic()
        try:
            with pytest.raises(LeadershipLost, match="not renewed for 1 s"):
                await elector.keep_renewing()
        finally:
            elector.api.close()
        return time.monotonic() - start

    if server == "refused":
        elapsed = asyncio.run(renew(f"http://127.0.0.1:{free_port()}"))
    else:
        with unanswering_server() as url:
            elapsed = asyncio.run(renew(url))
    # Never later than the deadline, whatever the calls do; before the lease duration runs out.
    assert 0.9 <= elapsed < 1.5, elapsed


# --- real operator processes ---------------------------------------------------------------

def election_flags(lease_duration: int, renew_deadline: float, retry_period: float = 0.3) -> list[str]:
    return ["--leader-elect", "--leader-election-namespace", "default",
            "--leader-election-lease-duration", str(lease_duration),
            "--leader-election-renew-deadline", str(renew_deadline),
            "--leader-election-retry-period", str(retry_period)]


@contextlib.contextmanager
def operators(emulated: EmulatedCluster, workdir: Path, flags: list[str],
              names: tuple[str, ...] = ("op-a", "op-b")) -> Iterator[dict[str, OperatorProcess]]:
    """Operator processes started together, each with its pod name; all stopped at the end."""
    processes = {}
    for name in names:
        (workdir / name).mkdir()
        processes[name] = OperatorProcess(emulated, workdir / name, flags, env={"POD_NAME": name})
    try:
        for process in processes.values():
            process.launch()
        for process in processes.values():
            process.wait_healthy()
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def holder(cluster: Cluster) -> str | None:
    return ((cluster.lease(LEASE_NAME) or {}).get("spec") or {}).get("holderIdentity")


def leading(cluster: Cluster, processes: dict[str, OperatorProcess]) -> str:
    """The name of the process the Lease names, once that process says it leads."""
    def check() -> str | None:
        name = (holder(cluster) or "").rpartition("_")[0]
        return name if name in processes and processes[name].metric("dreambooth_operator_leader") == 1 else None
    return wait_for(check, timeout=20, what="a leader")


class Race(NamedTuple):
    """Two operators after one of them took the Lease and made a job's two workers."""
    cluster: Cluster
    leader: OperatorProcess
    standby: OperatorProcess
    standby_name: str
    pods: list[dict[str, Any]]


@contextlib.contextmanager
def two_operators_and_a_job(emulated: EmulatedCluster, workdir: Path, flags: list[str], job: str) -> Iterator[Race]:
    cluster = Cluster(emulated)
    with operators(emulated, workdir, flags) as processes:
        first = leading(cluster, processes)
        [standby] = [name for name in processes if name != first]
        spec = copy.deepcopy(MINIMAL_SPEC)
        spec["workers"]["nodes"] = 2
        cluster.create_job(job, spec)
        pods = wait_for(lambda: len(p := cluster.pods(job)) == 2 and p, what="2 worker pods")
        yield Race(cluster, processes[first], processes[standby], standby, pods)


def test_one_of_two_operators_acts_and_a_sigterm_hands_over_at_once(emulated: EmulatedCluster,
                                                                      tmp_path: Path) -> None:
    # The default lease duration: only a release lets the standby take over within seconds.
    with two_operators_and_a_job(emulated, tmp_path, election_flags(15, 10), "shared") as race:
        cluster, leader, standby = race.cluster, race.leader, race.standby
        cluster.run_pods("shared")
        cluster.set_pod_status("shared-worker-1", terminated(1))
        # Both workers of the new gang: with one of them made, the old gang is gone too.
        wait_for(lambda: [gang_of(p) for p in cluster.pods("shared")] == ["1", "1"], what="the restarted gang")
        # The counter moves once the API server has answered, a moment after the pod shows.
        wait_for(lambda: pods_created(leader) >= 4, timeout=5, what="the leader's count of the second gang")
        # One operator acted: one restart, one Event, each pod made once. Two operators
        # without election both reconciled the job: each counted the restart, the
        # WorkerFailed Event got count 2.
        restarts = 'dreambooth_operator_restarts_total{reason="failure"}'
        assert leader.metric(restarts) == 1 and standby.metric(restarts) == 0
        assert pods_created(leader) == 4
        assert [e.get("count") for e in cluster.events("shared") if e["reason"] == "WorkerFailed"] == [1]
        assert standby.metric("dreambooth_operator_reconcile_seconds_count") == 0
        assert pods_created(standby) == 0
        assert standby.metric("dreambooth_operator_leader") == 0
        assert standby.healthy()  # a standby is alive and ready
        old_uids = {pod["metadata"]["uid"] for pod in race.pods}
        assert not old_uids & {pod["metadata"]["uid"] for pod in cluster.pods("shared")}

        leader.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert leader.process.wait(15) == 0
        wait_for(lambda: holder(cluster).startswith(f"{race.standby_name}_"), timeout=15, what="the standby leads")
        # Unreleased, the Lease (renewed every 0.3 s) would run out 14.7-15 s after the
        # SIGTERM; the margin is for a loaded machine, where the shutdown itself took 5 s.
        assert time.monotonic() - stopped < 10, "took over only as the 15 s lease ran out: not released"
        # The new leader carries the job on: the workers run, and it says so in status.
        cluster.run_pods("shared")
        wait_for(lambda: cluster.status("shared").get("phase") == "Running", what="Running, from the new leader")
        assert standby.metric("dreambooth_operator_leader") == 1
        assert "released Lease" in leader.log()


def test_a_killed_leaders_lease_is_taken_over_once_it_expires(emulated: EmulatedCluster, tmp_path: Path) -> None:
    with two_operators_and_a_job(emulated, tmp_path, election_flags(3, 2), "orphaned") as race:
        cluster = race.cluster
        race.leader.process.kill()
        killed = time.monotonic()
        wait_for(lambda: holder(cluster).startswith(f"{race.standby_name}_"), timeout=15, what="the standby leads")
        waited = time.monotonic() - killed
        # Not before the dead leader's Lease ran out (3 s since its last renewal, up to a
        # retry period before the kill), and soon after.
        assert 2.5 <= waited < 6, waited
        cluster.run_pods("orphaned")
        wait_for(lambda: cluster.status("orphaned").get("phase") == "Running", what="Running, from the new leader")
        assert [p["metadata"]["uid"] for p in cluster.pods("orphaned")] == [p["metadata"]["uid"] for p in race.pods]


def test_a_leader_that_sees_another_holder_exits_at_once(emulated: EmulatedCluster, tmp_path: Path) -> None:
    cluster = Cluster(emulated)
    with operators(emulated, tmp_path, election_flags(3, 2), names=("op-a",)) as processes:
        leading(cluster, processes)
        # Another operator's write (one that judged the Lease expired, say), straight into the API.
        stolen = cluster.lease(LEASE_NAME)
        stolen["spec"].update(holderIdentity="intruder_0000", leaseDurationSeconds=30,
                              renewTime=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        cluster.coordination.replace_namespaced_lease(LEASE_NAME, "default", stolen)
        taken = time.monotonic()
        assert processes["op-a"].process.wait(10) == 1
        assert time.monotonic() - taken < 2, "acted on after it saw another holder"
        assert "lost the Lease (the Lease is held by intruder_0000)" in processes["op-a"].log()
        assert holder(cluster) == "intruder_0000"  # it wrote nothing more
