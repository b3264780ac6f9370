"""What waiting workers are stuck on (troubles.py) and what their nodes did to them,
as tables of lifecycle.decide."""

from __future__ import annotations

import datetime as dt

import pytest
from pod_statuses import NOW, TIMING, condition, job_spec, pod, unscheduled, waiting

from dreambooth_operator import constants as c
from dreambooth_operator.clock import timestamp
from dreambooth_operator.lifecycle import decide
from dreambooth_operator.settings import Timing


def test_pods_pending_past_the_timeout_get_an_unschedulable_condition() -> None:
    young = decide(job_spec(nodes=1), {"phase": c.PHASE_PENDING}, [unscheduled(0)], NOW, TIMING)
    assert condition(young.status, c.CONDITION_UNSCHEDULABLE) is None
    assert young.requeue_after == pytest.approx(300)

    old = unscheduled(0, created=NOW - dt.timedelta(seconds=301))
    plan = decide(job_spec(nodes=1), {"phase": c.PHASE_PENDING}, [old], NOW, TIMING)
    stuck = condition(plan.status, c.CONDITION_UNSCHEDULABLE)
    assert stuck["status"] == "True" and "Insufficient nvidia.com/gpu" in stuck["message"]

    plan = decide(job_spec(nodes=1), plan.status, [pod(0)], NOW, TIMING)
    assert condition(plan.status, c.CONDITION_UNSCHEDULABLE)["status"] == "False"


PULL_MESSAGE = 'Back-off pulling image "registry.example/dreambooth-trainer:0.1.0x"'


def test_a_container_that_cannot_start_is_named_then_fails_the_job_at_the_start_timeout() -> None:
    timing = Timing(start_timeout_seconds=600)
    initializing = {"phase": c.PHASE_INITIALIZING, "restarts": 0, "preemptions": 0}
    pods = [pod(0), waiting(1, "ImagePullBackOff", PULL_MESSAGE)]
    first = decide(job_spec(), initializing, pods, NOW, timing)
    stuck = condition(first.status, c.CONDITION_CANNOT_START)
    assert (stuck["status"], stuck["reason"]) == ("True", "ImagePullBackOff")
    assert stuck["message"] == f"j-worker-1: ImagePullBackOff: {PULL_MESSAGE}"
    assert first.status["phase"] == c.PHASE_INITIALIZING and not first.delete
    assert first.events == [("Warning", "ImagePullBackOff", f"{stuck['message']} (the job fails if this lasts 600s)")]
    assert first.requeue_after == pytest.approx(600)

    # The kubelet flips between ErrImagePull and ImagePullBackOff: one Event, and the clock keeps running.
    later = decide(job_spec(), first.status, [pod(0), waiting(1, "ErrImagePull", "pull access denied")],
                   NOW + dt.timedelta(seconds=500), timing)
    assert later.events == [] and later.requeue_after == pytest.approx(100)
    assert condition(later.status, c.CONDITION_CANNOT_START)["lastTransitionTime"] == timestamp(NOW)

    failed = decide(job_spec(), later.status, pods, NOW + dt.timedelta(seconds=600), timing)
    assert failed.status["phase"] == c.PHASE_FAILED and sorted(failed.delete) == ["j-worker-0", "j-worker-1"]
    assert condition(failed.status, c.CONDITION_FAILED)["reason"] == "ImagePullBackOff"
    message = condition(failed.status, c.CONDITION_FAILED)["message"]
    assert message == (f"worker j-worker-1: ImagePullBackOff: {PULL_MESSAGE} (its container could not start for 600s); "
                       "fix spec.workers.image (or spec.workers.imagePullSecrets) and recreate the job")
    assert failed.status["lastFailure"] == {"pod": "j-worker-1", "reason": "ImagePullBackOff", "message": PULL_MESSAGE,
                                            "time": timestamp(NOW + dt.timedelta(seconds=600))}


def test_a_container_that_starts_after_all_clears_the_condition() -> None:
    timing = Timing(start_timeout_seconds=600)
    missing = 'secret "hf" not found'
    stuck = decide(job_spec(nodes=1), {"phase": c.PHASE_INITIALIZING}, [waiting(0, "CreateContainerConfigError", missing)],
                   NOW, timing)
    assert condition(stuck.status, c.CONDITION_CANNOT_START)["message"] == f"j-worker-0: CreateContainerConfigError: {missing}"
    # The Secret was created: the container starts.
    started = decide(job_spec(nodes=1), stuck.status, [pod(0)], NOW + dt.timedelta(seconds=30), timing)
    assert started.status["phase"] == c.PHASE_RUNNING
    assert condition(started.status, c.CONDITION_CANNOT_START)["status"] == "False"
    # Had it not, the fix names the Secret, not the image.
    failed = decide(job_spec(nodes=1), stuck.status, [waiting(0, "CreateContainerConfigError", missing)],
                    NOW + dt.timedelta(seconds=601), timing)
    assert "fix the Secret or ConfigMap the message names" in condition(failed.status, c.CONDITION_FAILED)["message"]


@pytest.mark.parametrize("reason,fails_at_once", [
    ("InvalidImageName", True),  # nothing will ever fix a malformed reference
    ("ErrImagePull", False), ("ErrImageNeverPull", False), ("CreateContainerError", False),
    ("ContainerCreating", None),  # a big image still downloading: no problem at all
])
def test_which_waiting_reasons_count(reason: str, fails_at_once: bool | None) -> None:
    plan = decide(job_spec(nodes=1), {"phase": c.PHASE_INITIALIZING}, [waiting(0, reason)], NOW, Timing())
    cannot_start = condition(plan.status, c.CONDITION_CANNOT_START)
    if fails_at_once is None:
        assert cannot_start is None and plan.status["phase"] == c.PHASE_INITIALIZING
    else:
        assert cannot_start["status"] == "True"
        assert (plan.status["phase"] == c.PHASE_FAILED) is fails_at_once
