"""The reconciler's small helpers (status merge patches, wake-ups), and what keeps a job's
loop alive when the API server stops answering: timed calls and a liveness probe."""

from __future__ import annotations

import asyncio
import socket
import time

import kubernetes
import pytest
from aiohttp.test_utils import TestClient, TestServer

from dreambooth_operator import reconciler as reconciler_module
from dreambooth_operator.health import build_app
from dreambooth_operator.kube import KubeApi
from dreambooth_operator.opmetrics import OperatorMetrics
from dreambooth_operator.reconciler import Reconciler, Wakeups, merge_patch


def test_merge_patch_sends_only_changes_and_nulls_removed_keys() -> None:
    old = {"phase": "Restarting", "restarts": 1, "nextRestartTime": "t1",
           "lastFailure": {"pod": "w-1", "exitCode": 1, "message": "boom"}}
    new = {"phase": "Pending", "restarts": 1, "lastFailure": {"pod": "w-0", "exitCode": 137}}
    assert merge_patch(old, new) == {
        "phase": "Pending",
        "nextRestartTime": None,
        "lastFailure": {"pod": "w-0", "exitCode": 137, "message": None},
    }
    assert merge_patch(new, new) == {}


def test_lists_are_replaced_whole() -> None:
    old = {"conditions": [{"type": "Running", "status": "True"}]}
    new = {"conditions": [{"type": "Running", "status": "False"}]}
    assert merge_patch(old, new) == new


def test_wakeups_ignore_repeats_of_the_same_generation() -> None:
    async def scenario() -> list[bool]:
        wakeups = Wakeups()
        event = wakeups.get("ns", "job")
        seen = []
        for marker in [(1, False), (1, False), (2, False), (2, True), (None, False)]:
            event.clear()
            wakeups.poke_if_changed("ns", "job", marker)
            seen.append(event.is_set())
        return seen

    assert asyncio.run(scenario()) == [True, False, True, True, True]


def test_wakeups_keep_nothing_for_a_job_without_a_loop() -> None:
    async def scenario() -> None:
        wakeups = Wakeups()
        # A deleted job's pods and its own DELETED event arrive after its loop ended.
        wakeups.poke("ns", "gone")
        wakeups.poke_if_changed("ns", "gone", (3, True))
        assert len(wakeups) == 0
        event = wakeups.get("ns", "job")
        wakeups.poke_if_changed("ns", "job", (1, False))
        assert event.is_set()
        wakeups.forget("ns", "job")
        wakeups.poke("ns", "job")
        wakeups.poke_if_changed("ns", "job", (2, False))
        assert len(wakeups) == 0

    asyncio.run(scenario())


@pytest.fixture
def silent_api_server():
    """An address that accepts connections and never answers: an API server behind a
    half-open connection (a fail-over, a load balancer's idle cut)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_pass_stuck_on_an_unanswered_call_ends_and_fails_liveness_meanwhile(silent_api_server, monkeypatch) -> None:
    monkeypatch.setattr(reconciler_module, "STUCK_PASS_SECONDS", 0.5)
    configuration = kubernetes.client.Configuration()
    configuration.host = silent_api_server

    async def scenario() -> None:
        api = KubeApi(configuration, request_timeout=(1, 3))
        reconciler = Reconciler(api, OperatorMetrics())
        client = TestClient(TestServer(build_app(reconciler.metrics, reconciler.stuck_jobs)))
        await client.start_server()
        try:
            started = time.monotonic()
            reconcile = asyncio.create_task(reconciler.reconcile("ns", "job"))
            await asyncio.sleep(1.0)
            response = await client.get("/healthz")
            assert response.status == 503 and "ns/job" in await response.text()
            with pytest.raises(Exception, match="[Tt]imed? ?out"):
                await reconcile  # the read timeout ends the pass; the job's loop retries
            assert time.monotonic() - started < 20  # a GET is retried 3 times: 4 x 3 s
            assert reconciler.stuck_jobs() == []
            assert (await client.get("/healthz")).status == 200
        finally:
            await client.close()
            api.close()

    asyncio.run(scenario())
