"""Resource placement as a pure function of the config (tests/test_placement.py).

Layouts:
- ``cpu``: every actor asks for a small CPU share; Ray packs them on the node (2 cores run everything).
- ``separate`` (GPU): rollout engines, policy ranks and reward ranks get whole GPUs of their own; the
  reference model rides along on the policy ranks' GPUs (a fraction each).
- ``colocate`` (GPU): one placement group of ``policy.world_size`` GPU bundles shared by every role:
  on each bundle a policy rank, a rollout engine (asleep while the learners train), a reward rank and
  the reference; fractions add up to 1 per GPU. This is what makes 2 GPUs enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from afd_ray.config import Config, ConfigError

CPU_SHARE = 0.1  # Ray CPU accounting per actor on a CPU-only run (they all share the node's cores)
COLOCATED_GPU_SHARE = {"policy": 0.4, "rollout": 0.3, "reward": 0.2, "reference": 0.1}
COLOCATED_GPU_SHARE_CRITIC = {"policy": 0.3, "rollout": 0.3, "reward": 0.15, "critic": 0.15, "reference": 0.1}


@dataclass
class Slot:
    """Where one actor runs: placement group ``group``, bundle ``bundle``, asking for ``resources``."""

    group: str
    bundle: int
    resources: dict[str, float]


@dataclass
class Plan:
    """groups: placement-group name -> bundles to reserve; roles: role -> one Slot per actor."""

    layout: str
    groups: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    roles: dict[str, list[Slot]] = field(default_factory=dict)

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


def plan(cfg: Config, roles: tuple[str, ...] = ("rollout", "policy", "reward", "reference", "critic")) -> Plan:
    """The placement of ``roles`` (a recipe that needs fewer actors reserves fewer resources)."""
    full = _plan(cfg)
    keep = {slot.group for role in roles for slot in full.roles.get(role, [])}
    return Plan(full.layout, {g: b for g, b in full.groups.items() if g in keep},
                {r: s for r, s in full.roles.items() if r in roles})


def _plan(cfg: Config) -> Plan:
    counts = {"rollout": cfg.rollout.num_workers, "policy": cfg.policy.world_size,
              "reward": cfg.reward.world_size, "reference": 1}
    if cfg.critic.enabled:
        counts["critic"] = cfg.critic.world_size
    if cfg.run.device == "cpu":
        p = Plan("cpu")
        for role, n in counts.items():
            p.groups[role] = [{"CPU": CPU_SHARE}] * n
            p.roles[role] = [Slot(role, i, {"CPU": CPU_SHARE}) for i in range(n)]
        return p
    tp = cfg.rollout.tensor_parallel_size
    if cfg.run.colocate:
        n = cfg.policy.world_size
        if cfg.rollout.num_workers * tp != n or cfg.reward.world_size != n or counts.get("critic", n) != n:
            raise ConfigError(
                f"colocate shares {n} GPUs (policy.world_size) between roles: rollout.num_workers * "
                f"rollout.tensor_parallel_size ({cfg.rollout.num_workers} * {tp}), reward.world_size "
                f"({cfg.reward.world_size}) and critic.world_size (with a critic) must all equal {n}")
        shares = COLOCATED_GPU_SHARE_CRITIC if cfg.critic.enabled else COLOCATED_GPU_SHARE
        p = Plan("colocate", groups={"colocated": [{"GPU": 1, "CPU": 2}] * n})
        for role, count in counts.items():
            share = shares[role] * (tp if role == "rollout" else 1)
            p.roles[role] = [Slot("colocated", i * (tp if role == "rollout" else 1), {"GPU": share, "CPU": 0.25})
                             for i in range(count)]
        return p
    p = Plan("separate")
    p.groups["rollout"] = [{"GPU": tp, "CPU": 1}] * cfg.rollout.num_workers
    p.roles["rollout"] = [Slot("rollout", i, {"GPU": tp, "CPU": 1}) for i in range(cfg.rollout.num_workers)]
    p.groups["policy"] = [{"GPU": 1, "CPU": 2}] * cfg.policy.world_size
    p.roles["policy"] = [Slot("policy", i, {"GPU": 0.8, "CPU": 1}) for i in range(cfg.policy.world_size)]
    p.roles["reference"] = [Slot("policy", 0, {"GPU": 0.2, "CPU": 1})]
    p.groups["reward"] = [{"GPU": 1, "CPU": 1}] * cfg.reward.world_size
    p.roles["reward"] = [Slot("reward", i, {"GPU": 1, "CPU": 1}) for i in range(cfg.reward.world_size)]
    if cfg.critic.enabled:
        p.groups["critic"] = [{"GPU": 1, "CPU": 1}] * cfg.critic.world_size
        p.roles["critic"] = [Slot("critic", i, {"GPU": 1, "CPU": 1}) for i in range(cfg.critic.world_size)]
    return p
