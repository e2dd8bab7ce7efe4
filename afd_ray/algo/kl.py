"""Per-token estimators of KL(pi || pi_ref) from samples y ~ pi (Schulman, "Approximating KL divergence").

With log_ratio = log pi(y_t) - log pi_ref(y_t) on tokens sampled from pi:
  k1 = log_ratio                          unbiased, high variance, can be negative
  k2 = 0.5 * log_ratio^2                  biased, low variance, >= 0
  k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, low variance, >= 0 (the GRPO penalty, seeds/004 Protocol 8)
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    estimator: str = "k1",
    clamp: float = 20.0,
) -> torch.Tensor:
    """KL(pi || pi_ref) estimate per token, (B, T) -> (B, T).

    logp_BT: log pi of the sampled tokens; ref_logp_BT: log pi_ref of the same tokens.
    clamp: |log_ratio| is clipped to this before k3's exp, so exp(100) cannot overflow float32 (e^88 does).
    Masking is the caller's: reduce with ``masked_mean``/``masked_sum``.
    """
    log_ratio = logp_BT.float() - ref_logp_BT.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-clamp, clamp)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {ESTIMATORS}")
