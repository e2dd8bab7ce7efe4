"""Resource placement as a pure function of the config (tests/test_placement.py).

Layouts:
- ``cpu``: every actor asks for a small CPU share; Ray packs them on the node (2 cores run everything).
- ``separate`` (GPU): rollout engines, policy ranks and reward ranks get whole GPUs of their own; a reference
  replica rides along on each policy rank's GPU (a fraction). Also the layout of ``run.logical_gpus``: the
  same bundles on Ray's logical GPUs while the actors compute on CPU (simulated clusters, dry runs).
- ``colocate`` (GPU): one placement group of ``policy.world_size`` GPU bundles shared by every role:
  on each bundle a policy rank, a rollout engine's worker (asleep while the learners train), a reward rank
  and a reference replica; fractions add up to 1 per GPU. This is what makes 2 GPUs enough.

Every GPU bundle holds one GPU: vLLM's Ray executor refuses bundles of more, and it is what lets a
tensor-parallel engine put one worker on each of ``tp`` bundles (``Slot.workers``).

The weight sync follows from the layout (``sync_backend``), and so do the NCCL communicators and the
GPUs their ranks sit on (``communicators``); ``plan`` refuses a GPU plan where two ranks of one
communicator would share a GPU (``check_communicators``), which NCCL cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from afd_ray.config import Config, ConfigError

CPU_SHARE = 0.1  # Ray CPU accounting per actor on a CPU-only run (they all share the node's cores)
COLOCATED_GPU_SHARE = {"policy": 0.4, "rollout": 0.3, "reward": 0.2, "reference": 0.1}
COLOCATED_GPU_SHARE_CRITIC = {"policy": 0.3, "rollout": 0.3, "reward": 0.15, "critic": 0.15, "reference": 0.1}
SEPARATE_REFERENCE_SHARE = 0.2  # of each policy GPU, next to the policy rank's 0.8
LEARNERS = ("policy", "reward", "critic")  # the DeepSpeed groups: one NCCL communicator each


@dataclass
class Slot:
    """Where one actor runs and what it asks for: bundle ``bundle`` of placement group ``group``, with
    ``resources`` for the actor itself and ``env`` in its environment.

    ``workers``: the bundles (of the same group) its model computes on, one GPU each. ``[bundle]`` for an
    actor that holds its GPU share itself. A tensor-parallel vLLM engine on a GPU layout holds no GPU: vLLM's
    Ray executor starts one worker actor per entry, on those bundles, each asking the GPU share that ``env``
    names (``VLLM_RAY_PER_WORKER_GPUS``, with the bundles in ``VLLM_RAY_BUNDLE_INDICES``); the actor is then
    scheduled with ``placement_group_capture_child_tasks`` so those workers land in its group."""

    group: str
    bundle: int
    resources: dict[str, float]
    workers: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.workers:
            self.workers = [self.bundle]

    @property
    def starts_workers(self) -> bool:
        """Whether its model runs in child actors (vLLM's TP workers) that must be placed in its group."""
        return self.workers != [self.bundle]


class Gpu(NamedTuple):
    """One GPU of a plan: GPU ``index`` of bundle ``bundle`` of placement group ``group`` (bundles hold one
    GPU, so the index is 0; it is there so that positions name a device, not a bundle)."""

    group: str
    bundle: int
    index: int = 0


@dataclass
class Plan:
    """groups: placement-group name -> bundles to reserve; roles: role -> one Slot per actor."""

    layout: str
    groups: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    roles: dict[str, list[Slot]] = field(default_factory=dict)

    def omp_threads(self, role: str, cores: int) -> int:
        """OpenMP threads for each actor of ``role`` (Ray starts actors with OMP_NUM_THREADS=1 otherwise).
        On the cpu layout the driver runs one phase at a time, so the actors of a role split the node's
        ``cores`` between them; on GPU layouts each actor gets the CPUs of its slot (its CPU-side work: host
        Adam with ZeRO offload, collation)."""
        slots = self.roles.get(role, [])
        if self.layout == "cpu":
            return max(1, cores // max(len(slots), 1))
        return max(1, int(slots[0].resources.get("CPU", 1))) if slots else 1

    @property
    def overlaps(self) -> bool:
        """Whether actors of different roles can compute at once, each on its own share: not on the cpu
        layout, where every role's actors take all of the node's cores (``omp_threads``) and two forward
        passes at once oversubscribe them (1.6x slower than one after the other, docs/LOG.md)."""
        return self.layout != "cpu"

    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for bundles in self.groups.values() for b in bundles)

    def needs(self) -> dict[str, float]:
        """Resource totals of every bundle of every group, e.g. {"GPU": 8, "CPU": 12}."""
        total: dict[str, float] = {}
        for bundles in self.groups.values():
            for b in bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0) + v
        return total

    def gpu_asked(self) -> dict[tuple[str, int], float]:
        """GPU asked of each bundle ``(group, index)`` by the actors on it and the TP workers they start."""
        asked: dict[tuple[str, int], float] = {}
        for slots in self.roles.values():
            for s in slots:
                share = float(s.env["VLLM_RAY_PER_WORKER_GPUS"]) if s.starts_workers else s.resources.get("GPU", 0.0)
                for b in s.workers:
                    asked[(s.group, b)] = asked.get((s.group, b), 0.0) + share
        return asked


def check_fits(p: Plan, cluster_resources: dict[str, float]) -> None:
    """Raise ConfigError when the plan's placement groups can never fit ``cluster_resources`` (the cluster's
    totals, as ``ray.cluster_resources()``): Ray would otherwise wait forever for them. Totals only: a bundle
    must also fit on one node, which this does not see."""
    need = p.needs()
    short = sorted(k for k, v in need.items() if v > cluster_resources.get(k, 0) + 1e-9)
    if not short:
        return
    groups = "; ".join(
        f"{name} ({', '.join(r for r, slots in p.roles.items() if slots and slots[0].group == name)}): "
        f"{len(bundles)} x {{{_fmt(bundles[0])}}}"
        for name, bundles in p.groups.items() if bundles)
    raise ConfigError(
        f"the {p.layout} placement needs {_fmt(need)} but the cluster has "
        f"{_fmt({k: cluster_resources.get(k, 0) for k in need})}; short of {', '.join(short)}. "
        f"Bundles per group (roles): {groups}. Lower rollout.num_workers, rollout.tensor_parallel_size, "
        f"policy.world_size, reward.world_size or critic.world_size, or add nodes")


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))


def sync_backend(cfg: Config) -> str:
    """How the weight sync reaches the engines: ``gloo`` when the actors compute on CPU (run.device=cpu,
    logical GPUs included); ``ipc`` when colocated, since every engine worker shares its GPU with a learner
    rank and NCCL refuses two ranks of one communicator on one device (CUDA IPC handles instead, as vLLM's
    own colocate example); ``nccl`` on separate GPUs (a broadcast from learner rank 0)."""
    if cfg.run.device == "cpu":
        return "gloo"
    return _gpu_sync_backend(cfg)


def _gpu_sync_backend(cfg: Config) -> str:
    return "ipc" if cfg.run.colocate else "nccl"


def communicators(p: Plan, backend: str) -> dict[str, list[Gpu]]:
    """Every NCCL communicator of a GPU run of ``p``, with the GPU of each rank in rank order: one per
    DeepSpeed group (policy, reward, critic; one rank per slot), and with ``backend`` nccl the weight-sync
    group (learner rank 0, then every TP worker of every engine)."""
    out = {role: [Gpu(s.group, s.bundle) for s in p.roles[role]] for role in LEARNERS if p.roles.get(role)}
    if backend == "nccl" and p.roles.get("policy") and p.roles.get("rollout"):
        lead = p.roles["policy"][0]
        out["weight_sync"] = [Gpu(lead.group, lead.bundle)] + [
            Gpu(s.group, w) for s in p.roles["rollout"] for w in s.workers]
    return out


def check_communicators(p: Plan, backend: str) -> None:
    """Raise ConfigError when two ranks of one NCCL communicator of ``p`` would share a GPU: NCCL cannot
    run that, and would fail only at the first collective, after minutes of model loading."""
    for name, ranks in communicators(p, backend).items():
        first: dict[Gpu, int] = {}
        for rank, gpu in enumerate(ranks):
            if gpu in first:
                hint = ("colocated engines share their GPUs with the learner ranks, so their weight sync must be "
                        "ipc (run.colocate=true), not an nccl broadcast" if name == "weight_sync" else
                        "each rank of a DeepSpeed group needs a GPU of its own")
                raise ConfigError(
                    f"the {name} communicator would put ranks {first[gpu]} and {rank} on one GPU (placement "
                    f"group {gpu.group!r}, bundle {gpu.bundle}); NCCL refuses two ranks of one communicator on "
                    f"one device: {hint}. Check run.colocate, rollout.num_workers, rollout.tensor_parallel_size "
                    f"and the world sizes")
            first[gpu] = rank


def plan(cfg: Config, roles: tuple[str, ...] = ("rollout", "policy", "reward", "reference", "critic")) -> Plan:
    """The placement of ``roles`` (a recipe that needs fewer actors reserves fewer resources). GPU layouts
    (logical GPUs included) are checked for communicators that NCCL could not run on a GPU run."""
    full = _plan(cfg)
    keep = {slot.group for role in roles for slot in full.roles.get(role, [])}
    p = Plan(full.layout, {g: b for g, b in full.groups.items() if g in keep},
             {r: s for r, s in full.roles.items() if r in roles})
    if p.layout != "cpu":
        check_communicators(p, _gpu_sync_backend(cfg))
    return p


def _engine(group: str, bundles: list[int], gpu_per_worker: float, cpu: float) -> Slot:
    """A vLLM engine computing on ``bundles`` (one per TP worker). One bundle: the engine actor holds its
    GPU share. More: the actor holds CPU only and vLLM's Ray executor puts a worker with ``gpu_per_worker``
    on each bundle, as the env tells it."""
    if len(bundles) == 1:
        return Slot(group, bundles[0], {"GPU": gpu_per_worker, "CPU": cpu})
    return Slot(group, bundles[0], {"CPU": cpu}, workers=list(bundles),
                env={"VLLM_RAY_PER_WORKER_GPUS": f"{gpu_per_worker:g}",
                     "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles))})


def _plan(cfg: Config) -> Plan:
    tp = cfg.rollout.tensor_parallel_size
    engines = cfg.rollout.num_workers
    learners = {"policy": cfg.policy.world_size, "reward": cfg.reward.world_size}
    if cfg.critic.enabled:
        learners["critic"] = cfg.critic.world_size
    if cfg.run.device == "cpu" and not cfg.run.logical_gpus:
        p = Plan("cpu")
        for role, n in {"rollout": engines, **learners, "reference": 1}.items():
            p.groups[role] = [{"CPU": CPU_SHARE}] * n
            p.roles[role] = [Slot(role, i, {"CPU": CPU_SHARE}) for i in range(n)]
        return p
    if cfg.run.colocate:
        n = cfg.policy.world_size
        if engines * tp != n or any(k != n for k in learners.values()):
            raise ConfigError(
                f"colocate shares {n} GPUs (policy.world_size) between roles: rollout.num_workers * "
                f"rollout.tensor_parallel_size ({engines} * {tp}), reward.world_size "
                f"({cfg.reward.world_size}) and critic.world_size (with a critic) must all equal {n}")
        shares = COLOCATED_GPU_SHARE_CRITIC if cfg.critic.enabled else COLOCATED_GPU_SHARE
        p = Plan("colocate", groups={"colocated": [{"GPU": 1, "CPU": 2}] * n})
        p.roles["rollout"] = [_engine("colocated", list(range(i * tp, (i + 1) * tp)), shares["rollout"], 0.25)
                              for i in range(engines)]
        for role in (*learners, "reference"):  # a reference replica on every GPU
            p.roles[role] = [Slot("colocated", i, {"GPU": shares[role], "CPU": 0.25}) for i in range(n)]
        return p
    p = Plan("separate")
    p.groups["rollout"] = [{"GPU": 1, "CPU": 1}] * (engines * tp)
    p.roles["rollout"] = [_engine("rollout", list(range(i * tp, (i + 1) * tp)), 1, 1) for i in range(engines)]
    n = cfg.policy.world_size
    p.groups["policy"] = [{"GPU": 1, "CPU": 2}] * n
    p.roles["policy"] = [Slot("policy", i, {"GPU": 1 - SEPARATE_REFERENCE_SHARE, "CPU": 1}) for i in range(n)]
    p.roles["reference"] = [Slot("policy", i, {"GPU": SEPARATE_REFERENCE_SHARE, "CPU": 1}) for i in range(n)]
    for role in ("reward", "critic"):
        if role in learners:
            p.groups[role] = [{"GPU": 1, "CPU": 1}] * learners[role]
            p.roles[role] = [Slot(role, i, {"GPU": 1, "CPU": 1}) for i in range(learners[role])]
    return p
