"""ActorGroup: the actors of one role, placed by ``afd_ray.placement``, driven by fan-out calls.

Submit to every rank and hand back ObjectRefs (``Pending``); callers wait once, for several groups at a
time with ``gather`` (Ray's "ray.get in a loop" anti-pattern is avoided by construction).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import ray

from afd_ray import faults
from afd_ray.placement import Plan, check_fits
from afd_ray.workers import logs


class CallTimeout(TimeoutError):
    """A remote call passed its deadline (``run.call_timeout_s``): the actor is hung or far too slow, and
    the runtime treats it as dead."""


def wait_all(refs: list[ray.ObjectRef], timeout_s: float | None, what: str) -> list[Any]:
    """``ray.get(refs)`` that fails fast and has a deadline.

    The first error raises at once (a dead rank's peers may be stuck in a collective waiting for it, so
    waiting for them in order would hang), and past ``timeout_s`` (None or 0: none) ``CallTimeout``
    names ``what``. The one place the driver waits on actors."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise CallTimeout(f"{what}: no answer within run.call_timeout_s={timeout_s:g} s")
        ray.get(done[0])  # raises the call's error, if any
    return ray.get(list(refs))


class Pending:
    """Calls submitted to one group's actors and not yet waited for: ``result()`` waits for them
    (``wait_all``, within the group's deadline) and returns ``convert`` of the answers, one per call."""

    def __init__(self, refs: list[ray.ObjectRef], timeout_s: float | None, what: str,
                 convert: Callable[[list[Any]], Any] = lambda answers: answers):
        self.refs, self.timeout_s, self.what, self.convert = refs, timeout_s, what, convert

    def then(self, convert: Callable[[Any], Any]) -> Pending:
        """The same calls, their result passed through ``convert`` as well."""
        first = self.convert
        return Pending(self.refs, self.timeout_s, self.what, lambda answers: convert(first(answers)))

    def result(self) -> Any:
        return self.convert(wait_all(self.refs, self.timeout_s, self.what))


def gather(*work: Pending | Any) -> list[Any]:
    """Wait for the calls of several groups at once, so they run concurrently, and return each one's
    result in order. The first failure raises at once; the deadline is the longest of theirs (none if any
    has none). Anything that is not ``Pending`` is already a result (the driver's fakes) and passes through."""
    pending = [w for w in work if isinstance(w, Pending)]
    timeouts = [p.timeout_s for p in pending]
    timeout = None if not timeouts or None in timeouts else max(timeouts)
    answers = iter(wait_all([r for p in pending for r in p.refs], timeout, " + ".join(p.what for p in pending)))
    return [w.convert([next(answers) for _ in w.refs]) if isinstance(w, Pending) else w for w in work]


def run_calls(calls: list[Callable[[], Pending | Any] | None], together: bool = True) -> list[Any]:
    """Make each call (None: skipped, result None) and return the results in order: every call submitted
    first and all waited for at once (``gather``), or with ``together=False`` each waited for before the
    next is made, for actors that share the same cores (``Plan.overlaps``)."""
    if together:
        return gather(*[call() if call else None for call in calls])
    return [gather(call())[0] if call else None for call in calls]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # free on every interface: other nodes connect to it
        return s.getsockname()[1]


def reserve(plan: Plan) -> dict[str, Any]:
    """Create (and wait for) every placement group of the plan: all-or-nothing start."""
    from ray.util.placement_group import placement_group

    groups = {name: placement_group(bundles, strategy="PACK") for name, bundles in plan.groups.items()}
    ready = [pg.ready() for pg in groups.values()]
    _, pending = ray.wait(ready, num_returns=len(ready), timeout=30)
    if pending:  # a plan larger than the cluster would wait forever; an autoscaler may still be adding nodes
        check_fits(plan, ray.cluster_resources())
        ray.get(pending)
    return groups


class Rendezvous(NamedTuple):
    """Where a ranked group's torch.distributed store is bound: ``addr``:``port`` on node ``node_id``."""

    addr: str
    port: int
    node_id: str


def _rendezvous_here() -> Rendezvous:
    return Rendezvous(ray.util.get_node_ip_address(), free_port(), ray.get_runtime_context().get_node_id())


def rendezvous_point(pg, index: int) -> Rendezvous:
    """(IP, free port, node id) of the node that holds bundle ``index``. Rank 0 binds the torch.distributed
    store there, so the port is picked on that node (on a cluster it is seldom the driver's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][index]
    probe = ray.remote(num_cpus=0)(_rendezvous_here)
    ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    return wait_all([ref], 300.0, "the rendezvous probe on rank 0's node")[0]


class ActorGroup:
    """One actor of ``cls`` per slot of ``plan.roles[role]``, with the slot's resources and environment
    (and ``env`` on top); a slot whose engine starts its own workers (``Slot.starts_workers``: vLLM's
    tensor-parallel workers) is scheduled so that they land in its placement group too. With ``ranked``,
    actor i also gets rank=i, world_size, master_addr and master_port (``rendezvous``: on rank 0's node).
    With ``log_dir``, actor i's output goes to ``log_dir/<role>-<i>.log`` (afd_ray.workers.logs)."""

    def __init__(self, cls: type, plan: Plan, role: str, groups: dict[str, Any], *args, ranked: bool = False,
                 env: dict[str, str] | None = None, timeout_s: float | None = None, log_dir: str | None = None,
                 **kwargs):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.slots = plan.roles[role]
        self.role, self.world_size, self.timeout_s = role, len(self.slots), timeout_s or None
        remote_cls = ray.remote(cls)
        extra: dict[str, Any] = {}
        self.rendezvous: Rendezvous | None = None
        if ranked:
            self.rendezvous = rendezvous_point(groups[self.slots[0].group], self.slots[0].bundle)
            extra = {"world_size": self.world_size, "master_port": self.rendezvous.port,
                     "master_addr": self.rendezvous.addr}
        self.actors = []
        for i, slot in enumerate(self.slots):
            options: dict[str, Any] = {
                "num_cpus": slot.resources.get("CPU", 0),
                "num_gpus": slot.resources.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    groups[slot.group], placement_group_bundle_index=slot.bundle,
                    placement_group_capture_child_tasks=slot.starts_workers),
            }
            env_vars = {**slot.env, **(env or {}), **faults.env(), **logs.actor_env(log_dir, role, i)}
            if env_vars:
                options["runtime_env"] = {"env_vars": env_vars}
            rank = {"rank": i} if ranked else {}
            self.actors.append(remote_cls.options(**options).remote(*args, **kwargs, **extra, **rank))

    def run(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call ``method`` on every actor with the same arguments; one ObjectRef per actor."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def submit(self, method: str, *args, **kwargs) -> Pending:
        """``run``, to be waited for later (``Pending.result``, ``gather``) within the group's deadline."""
        return Pending(self.run(method, *args, **kwargs), self.timeout_s, f"{self.role}.{method}")

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """``run`` and wait for every rank, within the group's deadline."""
        return self.submit(method, *args, **kwargs).result()

    def submit_each(self, method: str, args: list[tuple | None]) -> Pending:
        """Call ``method`` on actor i with ``args[i]`` (None: not at all); one answer per call made."""
        refs = [getattr(a, method).remote(*x) for a, x in zip(self.actors, args) if x is not None]
        return Pending(refs, self.timeout_s, f"{self.role}.{method}")

    def call_each(self, method: str, args: list[tuple | None]) -> list[Any]:
        """``submit_each`` and wait, within the deadline."""
        return self.submit_each(method, args).result()

    def ready(self, timeout_s: float | None) -> None:
        """Wait until every actor is constructed (model loaded, engine started)."""
        wait_all([a.__ray_ready__.remote() for a in self.actors], timeout_s, f"starting the {self.role} actors")

    def dead(self) -> bool:
        """Whether Ray reports an actor of the group dead: a no-op call on it fails within 10 s. An actor
        that is alive but busy (a rank blocked in a collective with a failed peer) just does not answer,
        and is not counted: its error is a bug to report, not a fault to restart from."""
        refs = [a.__ray_ready__.remote() for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=10.0)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return True
        return False

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def unshard(parts: list[list[Any]]) -> list[Any]:
    """Undo ``rank::world_size`` sharding: element i came from part i % W at position i // W."""
    out = []
    for i in range(sum(len(p) for p in parts)):
        out.append(parts[i % len(parts)][i // len(parts)])
    return out
