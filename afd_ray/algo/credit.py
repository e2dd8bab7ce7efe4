"""From scored rollouts to the policy learner's batch: the policy step of the IRL loop (seeds/004 Eq. 21b).

Pure: rewards, sampler and reference log-probs in; a ``PolicyBatch`` out. The learner stays algorithm-blind.
"""

from __future__ import annotations

import torch

from afd_ray.algo.advantages import (
    gae_advantages,
    grpo_advantages,
    kl_shaped_reward,
    rloo_advantages,
    token_rewards,
)
from afd_ray.algo.selection import select_online_dpo_pairs
from afd_ray.types import PolicyBatch, Samples, SequenceBatch

ALGOS = ("rloo", "grpo", "reinforce", "ppo", "online_dpo")


def ragged_to_padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-token values -> (B, T) values and mask."""
    width = max((len(r) for r in rows), default=0)
    values, mask = torch.zeros(len(rows), max(width, 1)), torch.zeros(len(rows), max(width, 1))
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1
    return values, mask


def sequences(samples: Samples) -> SequenceBatch:
    return SequenceBatch([samples.prompt_of(k) for k in range(len(samples.response_ids))], samples.response_ids)


def policy_batch(algo: str, samples: Samples, reward_B: torch.Tensor, ref_logp: list[list[float]], *, beta: float,
                 kl_estimator: str = "k1", kl_in_reward: bool = True, clip_eps: float = 0.2,
                 dual_clip: float = 0.0, dpo_beta: float = 0.1, dpo_min_gap: float = 0.0,
                 chosen_nll_weight: float = 0.0,
                 old_logp: list[list[float]] | None = None, values: list[list[float]] | None = None,
                 gamma: float = 1.0, lam: float = 0.95,
                 importance_cap: float = 0.0) -> tuple[PolicyBatch, dict[str, float]]:
    """Credit assignment for ``algo``. Returns the batch and the statistics it was built from.

    rloo / grpo / reinforce / ppo: with ``kl_in_reward`` the sequence reward becomes
    r - beta * sum_t KL_t (seeds/004 Protocol 5); otherwise the learner adds beta * KL_t (k3) to the loss
    and the advantages come from r alone (seeds/004 Protocol 8; ``policy.kl``, auto: so for grpo).
    rloo: leave-one-out baseline; grpo and ppo: group-normalised advantages; reinforce: the shaped reward
    itself. With ``old_logp`` (learner log-probs before the update: ppo, or several optimizer steps per
    iteration) the ratio to it is clipped; without, the step is on-policy and the ratio is exactly 1.
    online_dpo: best vs worst sample of each prompt by reward, DPO loss against pi_ref, plus
    ``chosen_nll_weight`` times the chosen sample's per-token NLL.
    ppo with ``values`` (a critic's V per response token): token rewards -beta * KL_t plus r at the last
    token, GAE(gamma, lam) advantages whitened over the batch; the batch also carries the returns (the
    critic's targets) in ``returns``.
    With ``old_logp`` and ``importance_cap`` C > 0 the samples are treated as drawn by another policy mu
    (the engine's ``samples.logprobs``: one step older under async rollout, other kernels): the pg loss
    carries per-token weights min(pi_old / mu, C) (``PolicyBatch.is_weight``), and the KL to pi_ref is
    estimated with pi_old's log-probs, the policy being regularised, instead of mu's.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown policy algo {algo!r}; choose one of {ALGOS}")
    seqs = sequences(samples)
    logp_BT, mask_BT = ragged_to_padded(samples.logprobs)
    is_weight, stats = None, {}
    if old_logp is not None and importance_cap > 0:
        old_BT, _ = ragged_to_padded(old_logp)
        log_ratio_BT = old_BT - logp_BT
        raw_BT = torch.exp(log_ratio_BT.clamp(-20.0, 20.0))
        w_BT = raw_BT.clamp(max=importance_cap) * mask_BT
        is_weight = [w_BT[i, : len(r)].tolist() for i, r in enumerate(old_logp)]
        tokens = mask_BT.sum().clamp(min=1)
        stats = {"is_weight": float(w_BT.sum() / tokens),
                 "is_truncated": float(((raw_BT > importance_cap).float() * mask_BT).sum() / tokens),
                 "engine_learner_logp_diff": float((log_ratio_BT.abs() * mask_BT).sum() / tokens)}
        logp_BT = old_BT  # the KL of the policy being regularised
    ref_BT, _ = ragged_to_padded(ref_logp)
    shaped_B = kl_shaped_reward(reward_B, logp_BT, ref_BT, mask_BT, beta, kl_estimator)
    stats |= {"reward": float(reward_B.mean()), "shaped_reward": float(shaped_B.mean()),
              "kl": float(((logp_BT - ref_BT) * mask_BT).sum(1).mean())}
    if algo == "online_dpo":
        sel = select_online_dpo_pairs(reward_B, samples.n, min_gap=dpo_min_gap)
        keep = [(int(c), int(r)) for c, r, v in zip(sel.chosen_P, sel.rejected_P, sel.valid_P) if v]
        order = [k for pair in keep for k in pair]
        ref_seq = torch.tensor([sum(ref_logp[k]) for k in order])
        stats["dpo_pairs"] = float(len(keep))
        batch = PolicyBatch("dpo", SequenceBatch([seqs.prompts[k] for k in order], [seqs.responses[k] for k in order]),
                            ref_seq_logp=ref_seq, beta=dpo_beta, nll_coef=chosen_nll_weight)
        return batch, stats
    signal_B = shaped_B if kl_in_reward else reward_B.float()
    if algo == "rloo":
        adv_B = rloo_advantages(signal_B, samples.n)
    elif algo in ("grpo", "ppo"):
        adv_B = grpo_advantages(signal_B, samples.n)
    else:
        adv_B = signal_B
    if values is not None:  # ppo with a critic: token rewards, GAE, whitened token advantages
        if algo != "ppo":
            raise ValueError(f"a critic's values are for policy.algo=ppo, got {algo}")
        value_BT, _ = ragged_to_padded(values)
        r_BT = token_rewards(reward_B, logp_BT, ref_BT, mask_BT, beta if kl_in_reward else 0.0, kl_estimator)
        adv_BT, ret_BT = gae_advantages(r_BT, value_BT, mask_BT, gamma, lam)
        mean = (adv_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)
        var = (((adv_BT - mean) * mask_BT) ** 2).sum() / mask_BT.sum().clamp(min=1)
        white_BT = (adv_BT - mean) / (var.sqrt() + 1e-8) * mask_BT
        lengths = [len(v) for v in values]
        stats |= {"value": float((value_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)),
                  "return": float((ret_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1))}
        batch = PolicyBatch("pg", seqs, token_advantages=[white_BT[i, :k].tolist() for i, k in enumerate(lengths)],
                            old_logp=old_logp, ref_logp=ref_logp, kl_coef=0.0 if kl_in_reward else beta,
                            kl_estimator="k3" if not kl_in_reward else kl_estimator, clip_eps=clip_eps,
                            dual_clip=dual_clip or None, returns=[ret_BT[i, :k].tolist() for i, k in enumerate(lengths)],
                            is_weight=is_weight)
        return batch, stats
    batch = PolicyBatch("pg", seqs, advantages=adv_B, old_logp=old_logp,
                        ref_logp=ref_logp, kl_coef=0.0 if kl_in_reward else beta,
                        kl_estimator="k3" if not kl_in_reward else kl_estimator, clip_eps=clip_eps,
                        dual_clip=dual_clip or None, is_weight=is_weight)
    return batch, stats
