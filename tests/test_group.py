"""The group helper on real Ray: ``gather`` waits for several groups' calls at once, so they run
concurrently, returns results in order, and raises the first failure without waiting for the rest."""

import time

import pytest

from afd_ray.placement import Plan, Slot
from afd_ray.workers.group import ActorGroup, gather, reserve, run_calls


@pytest.fixture
def two_groups(ray_local):
    from ray.util.placement_group import remove_placement_group

    class Napper:  # defined here, so Ray ships it by value (the workers cannot import a test module)
        def nap(self, seconds: float, fail: bool = False) -> tuple[float, float]:
            start = time.time()
            time.sleep(seconds)
            if fail:
                raise ValueError("napper failed")
            return start, time.time()

    plan = Plan("cpu", groups={"g": [{"CPU": 0.01}, {"CPU": 0.01}]},
                roles={"a": [Slot("g", 0, {"CPU": 0.01})], "b": [Slot("g", 1, {"CPU": 0.01})]})
    pgs = reserve(plan)
    groups = [ActorGroup(Napper, plan, role, pgs, timeout_s=60) for role in ("a", "b")]
    yield groups
    for g in groups:
        g.kill()
    for pg in pgs.values():
        remove_placement_group(pg)


def test_gather_runs_groups_at_once_and_keeps_the_order(two_groups):
    a, b = two_groups
    spans = gather(a.submit("nap", 1.0).then(lambda answers: answers[0]), None,
                   b.submit("nap", 1.0).then(lambda answers: answers[0]), 7)
    (a0, a1), passed, (b0, b1), value = spans
    assert passed is None and value == 7  # what is not Pending is already a result (the driver's fakes)
    assert max(a0, b0) < min(a1, b1)  # the two naps overlapped


def test_run_calls_one_after_another_for_actors_that_share_cores(two_groups):
    a, b = two_groups
    first = [lambda: a.submit("nap", 0.5).then(lambda answers: answers[0]), None,
             lambda: b.submit("nap", 0.5).then(lambda answers: answers[0])]
    (a0, a1), skipped, (b0, b1) = run_calls(first, together=False)
    assert skipped is None and a1 <= b0  # b was called only after a answered
    (a0, a1), _, (b0, b1) = run_calls(first, together=True)
    assert max(a0, b0) < min(a1, b1)


def test_gather_raises_the_first_failure_without_waiting_for_the_rest(two_groups):
    import ray

    a, b = two_groups
    slow = b.submit("nap", 30.0)
    with pytest.raises(ray.exceptions.RayTaskError, match="napper failed"):
        gather(slow, a.submit("nap", 0.2, True))
    assert not ray.wait(slow.refs, timeout=0)[0]  # the other call is still running
