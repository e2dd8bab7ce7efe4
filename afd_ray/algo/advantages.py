"""Critic-free credit assignment: KL-shaped rewards (REINFORCE), RLOO and GRPO group baselines."""

from __future__ import annotations

import torch

from afd_ray.algo.kl import kl_per_token
from afd_ray.algo.masked import masked_sum


def kl_shaped_reward(
    reward_B: torch.Tensor,
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Sequence reward with the KL folded in (seeds/004 Protocol 5, line 5):

        r~(x, y) = r(x, y) - beta * sum_t KL_t,   KL_t = log pi(y_t) - log pi_ref(y_t) for k1.

    reward_B: (B,) reward-model scores; logp_BT, ref_logp_BT, mask_BT: (B, T) over response tokens.
    Returns (B,), detached: it is a fixed target for the policy gradient.
    """
    kl_B = masked_sum(kl_per_token(logp_BT, ref_logp_BT, estimator), mask_BT)
    return (reward_B.float() - beta * kl_B).detach()


def _groups(reward_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or reward_B.numel() % group_size:
        raise ValueError(
            f"rewards of {reward_B.numel()} samples do not split into groups of {group_size} "
            "(samples must be laid out prompt-major: n consecutive samples per prompt)"
        )
    return reward_B.float().view(-1, group_size)


def rloo_advantages(reward_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j within each prompt's group of n samples.

    reward_B: (P * n,) prompt-major. Equal to n/(n-1) * (r_i - mean_j r_j). Returns (P * n,), detached.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs at least 2 samples per prompt, got n={group_size}")
    r_PN = _groups(reward_B, group_size)
    baseline_PN = (r_PN.sum(1, keepdim=True) - r_PN) / (group_size - 1)
    return (r_PN - baseline_PN).reshape(-1).detach()


def grpo_advantages(
    reward_B: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group advantage (seeds/004 Protocol 8, line 5): A_j = (r_j - mean(r)) / std(r), per prompt.

    reward_B: (P * n,) prompt-major. std is the unbiased sample std; a group with equal rewards gets
    A = 0 (eps keeps it finite). scale=False gives the Dr. GRPO variant (no std division).
    Returns (P * n,), detached.
    """
    if group_size < 2:
        raise ValueError(f"grpo needs at least 2 samples per prompt, got n={group_size}")
    r_PN = _groups(reward_B, group_size)
    centred_PN = r_PN - r_PN.mean(1, keepdim=True)
    if scale:
        centred_PN = centred_PN / (r_PN.std(1, keepdim=True) + eps)
    return centred_PN.reshape(-1).detach()


def token_rewards(reward_B: torch.Tensor, logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor,
                  beta: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards for PPO with a critic (seeds/004 Protocol 5 in token form, as in the TL;DR setup
    of seeds/002): r_t = -beta * KL_t at every response token, plus r(x, y) at the last one.

    reward_B: (B,); logp_BT, ref_logp_BT, mask_BT: (B, T) over response tokens (left-aligned, mask 1 on
    the response). Returns (B, T), zero where mask is 0, detached.
    """
    r_BT = -beta * kl_per_token(logp_BT, ref_logp_BT, estimator) * mask_BT
    last_B = (mask_BT.sum(1).long() - 1).clamp(min=0)
    r_BT = r_BT.clone()
    r_BT[torch.arange(r_BT.shape[0]), last_B] += reward_B.float() * (mask_BT.sum(1) > 0)
    return r_BT.detach()


def gae_advantages(reward_BT: torch.Tensor, value_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016):

        delta_t = r_t + gamma * V_{t+1} - V_t   (V after the last token = 0),
        A_t = sum_l (gamma * lam)^l * delta_{t+l},   returns R_t = A_t + V_t (the critic's target).

    reward_BT, value_BT, mask_BT: (B, T), response tokens left-aligned (mask is a prefix of ones).
    Returns (advantages_BT, returns_BT), zero outside the mask, detached.
    """
    r, v, m = reward_BT.float(), value_BT.float() * mask_BT, mask_BT.float()
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv.detach(), ((adv + v) * m).detach()
