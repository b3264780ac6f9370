"""The reconciler's small pure helpers: status merge patches and wake-ups."""

from __future__ import annotations

import asyncio

from dreambooth_operator.reconciler import Wakeups, merge_patch


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
