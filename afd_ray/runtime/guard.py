"""The non-finite guard: NaN/inf in rewards, losses, gradient norms or sync log-probs is caught where it
appears, the step is skipped and counted, and too many in a row stop the run."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

log = logging.getLogger("afd_ray")


class NonFiniteError(RuntimeError):
    """``run.max_nonfinite`` steps in a row of one role were skipped for NaN/inf: the run stops (its last
    checkpoint is from before them, and ``--resume`` continues from it)."""


def finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)


class NonFiniteGuard:
    """Per role: skips in a row and in total. ``ok(role, t, finite)`` resets the role's streak or counts a
    skip (and raises ``NonFiniteError`` at ``limit`` in a row); ``clean`` is whether no role is in a streak,
    which is when a checkpoint may be written."""

    def __init__(self, limit: int, total: dict[str, int] | None = None):
        self.limit = limit
        self.streak: dict[str, int] = {}
        self.total: dict[str, int] = dict(total or {})  # restored from a checkpoint: counts of the whole run

    def ok(self, role: str, t: int, is_finite: bool, what: str = "") -> bool:
        if is_finite:
            self.streak[role] = 0
            return True
        self.streak[role] = self.streak.get(role, 0) + 1
        self.total[role] = self.total.get(role, 0) + 1
        if self.streak[role] >= self.limit:
            raise NonFiniteError(
                f"{role}: non-finite {what or 'values'} at iteration {t}, {self.streak[role]} steps in a row "
                f"(run.max_nonfinite={self.limit}); the run stops here with its last checkpoint from before them. "
                "Look at the learning rate and the data of that role, then --resume RUN_DIR with a fix.")
        return False

    @property
    def clean(self) -> bool:
        return not any(self.streak.values())

    def metrics(self) -> dict[str, float]:
        return {f"{role}/nonfinite_skips": float(n) for role, n in sorted(self.total.items())}


def reward_saturation(m: dict[str, float], t: int) -> None:
    """Reward-model health, which no peer reports: ``heldout/reward_saturated`` is 1 when the reward model
    tells every held-out demonstration from the policy's sample (held-out accuracy 1.0), with a warning. On
    the toy this preceded overfitting: the KL rose to 5-7 and the golden reward fell back from its peak
    (docs/LOG.md 2026-11-26), so a user sees it as it starts."""
    acc = m.get("heldout/reward_accuracy")
    if acc is None:
        return
    m["heldout/reward_saturated"] = float(acc >= 1.0)
    if acc >= 1.0:
        log.warning("iteration %d: held-out reward accuracy %.2f (gap %.3f): the reward model separates every "
                    "held-out demonstration from the policy's sample, which on the toy preceded overfitting "
                    "(rising KL, falling golden reward); consider a lower reward.lr, fewer "
                    "reward.updates_per_iteration or a shorter reward.replay_window", t, acc,
                    m.get("heldout/reward_gap", float("nan")))
