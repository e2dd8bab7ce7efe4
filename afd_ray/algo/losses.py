"""Training objectives of every method in DESIGN.md Sec. 1, as pure functions on tensors.

Each takes log-probabilities, scores or values (never models), returns a scalar loss (plus detached
statistics where a caller logs them), and cites the equation it implements. ``ell(z) = log sigmoid(z)``
is computed with ``F.logsigmoid``, which is finite for any finite z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd_ray.algo.masked import batch_mean, masked_mean, masked_sum

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: large enough never to bind in practice, small enough not to overflow


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, reduction: str = "token",
             denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Behaviour cloning NLL on demonstrations (seeds/004 Protocol 1; seeds/000 Eq. 6-7, forward KL):

        l_SFT = -log pi(y* | x) = -sum_t log pi(y*_t | x, y*_<t).

    logp_BT: (B, T) log pi of the demonstration tokens; mask_BT: (B, T), 1 on response tokens only.
    reduction: "token" = mean over all response tokens in the batch (long answers weigh more; the usual
    SFT choice); "sequence" = per-sequence sum, mean over the batch (Protocol 1 exactly).
    denom: global token (or sequence) count for data-parallel ranks (``masked_mean``).
    """
    if reduction == "token":
        return -masked_mean(logp_BT, mask_BT, denom=denom)
    if reduction == "sequence":
        return -batch_mean(masked_sum(logp_BT, mask_BT), denom)
    raise ValueError(f"sft reduction must be 'token' or 'sequence', got {reduction!r}")


def bradley_terry_loss(
    r_chosen_B: torch.Tensor,
    r_rejected_B: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    p_chosen_B: torch.Tensor | None = None,
    denom: float | torch.Tensor | None = None,
    weight_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of preferences (seeds/004 Eq. 13):

        l_RM = -E[ log sigmoid(r(x, y_w) - r(x, y_l) - m) ].

    r_chosen_B, r_rejected_B: (B,) scalar rewards of the preferred / dispreferred responses.
    margin: m, scalar or (B,), demands a gap of at least m (Llama-2 style margin); 0 gives Eq. 13.
    p_chosen_B: optional (B,) soft labels P(y_w > y_l); the loss becomes the binary cross-entropy
    -[p log s(d) + (1-p) log s(-d)], which equals Eq. 13 at p = 1.
    denom: global pair count for data-parallel ranks (``batch_mean``).
    weight_B: optional (B,) per-pair weights w_i: sum_i w_i l_i / B (or / denom). See
    ``pairwise_reward_loss`` for the weights that give AIHF's Eq. 24a.
    """
    d_B = r_chosen_B.float() - r_rejected_B.float() - margin
    if p_chosen_B is None:
        loss_B = -F.logsigmoid(d_B)
    else:
        p_B = p_chosen_B.float()
        loss_B = -(p_B * F.logsigmoid(d_B) + (1 - p_B) * F.logsigmoid(-d_B))
    if weight_B is not None:
        loss_B = weight_B.float() * loss_B
    return batch_mean(loss_B, denom)


def pairwise_reward_loss(
    r_demo_B: torch.Tensor, r_policy_B: torch.Tensor, margin: float | torch.Tensor = 0.0,
    denom: float | torch.Tensor | None = None, weight_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """IRL reward step (seeds/004 Eq. 21a with ell = log sigmoid): the demonstration y* is preferred to
    the current policy's sample y' for the same prompt,

        phi_{t+1} = argmin_phi -E[ log sigmoid(r(x, y*) - r(x, y') - m) ].

    r_demo_B, r_policy_B: (B,) rewards of paired (x, y*) and (x, y'). It is Eq. 13 with y_w = y*, so the
    reward learner's "pairwise" loss also trains the Bradley-Terry baseline on preference pairs.
    AIHF (seeds/004 Eq. 24a) is this loss over n = n_d demo pairs followed by n_p preference pairs with
    weight_B = gamma * n / n_d on the demo pairs and alpha * n / n_p on the preference pairs:

        sum_i w_i l_i / n = gamma * mean_demo(l) + alpha * mean_pref(l).

    denom: global pair count for data-parallel ranks; weight_B: optional (B,) per-pair weights.
    """
    return bradley_terry_loss(r_demo_B, r_policy_B, margin, denom=denom, weight_B=weight_B)


def discriminator_loss(logit_pos_B: torch.Tensor, logit_neg_B: torch.Tensor,
                       denom_pos: float | torch.Tensor | None = None, denom_neg: float | torch.Tensor | None = None,
                       weight_pos_B: torch.Tensor | None = None,
                       weight_neg_B: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise discriminator BCE (seeds/000 Eq. 11), with D = sigmoid(logit):

        max_phi E_pos[log D(y|x)] + E_neg[log(1 - D(y|x))]
        loss = -mean log sigmoid(logit_pos) - mean log sigmoid(-logit_neg).

    logit_pos_B: (B,) logits of positives (demonstrations, or pi_SFT samples for Init-SFT, Table 1);
    logit_neg_B: (B',) logits of negatives (policy / pi_init samples); B and B' may differ.
    The reward of Eq. 12, r = log D - log(1 - D), is the logit itself, so the scalar head's output is
    used as the reward unchanged.
    denom_pos / denom_neg: global counts for data-parallel ranks (``batch_mean``).
    weight_pos_B (B,) / weight_neg_B (B',): optional per-example weights inside each mean.
    """
    pos_B, neg_B = -F.logsigmoid(logit_pos_B.float()), -F.logsigmoid(-logit_neg_B.float())
    if weight_pos_B is not None:
        pos_B = weight_pos_B.float() * pos_B
    if weight_neg_B is not None:
        neg_B = weight_neg_B.float() * neg_B
    return batch_mean(pos_B, denom_pos) + batch_mean(neg_B, denom_neg)


def _logratio_margin(
    logp_chosen_B: torch.Tensor,
    logp_rejected_B: torch.Tensor,
    ref_logp_chosen_B: torch.Tensor,
    ref_logp_rejected_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit-reward log ratios log pi/pi_ref for chosen and rejected, (B,) each."""
    return (
        logp_chosen_B.float() - ref_logp_chosen_B.float(),
        logp_rejected_B.float() - ref_logp_rejected_B.float(),
    )


def dpo_loss(
    logp_chosen_B: torch.Tensor,
    logp_rejected_B: torch.Tensor,
    ref_logp_chosen_B: torch.Tensor,
    ref_logp_rejected_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    denom: float | torch.Tensor | None = None,
    weight_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (seeds/004 Eq. 18, Protocol 6):

        l = -log sigmoid( beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l) ).

    Inputs are (B,) sequence log-probabilities (sums over response tokens) of the policy and reference.
    label_smoothing eps > 0 gives conservative DPO: (1-eps) l(h) + eps l(-h).
    Returns (loss, stats) with the implicit rewards beta*log(pi/pi_ref) (B,) and the pair accuracy.
    SPIN (seeds/004 Protocol 2 / Eq. 12 with the logistic ell) is this loss with the demonstration as y_w,
    the policy's own sample as y_l and the previous iterate pi_t in place of pi_ref. weight_B: a weight per
    pair (SPAC, seeds/004 after Eq. 24: gamma on demonstration-vs-sample pairs, alpha on preference pairs).
    """
    lr_w, lr_l = _logratio_margin(logp_chosen_B, logp_rejected_B, ref_logp_chosen_B, ref_logp_rejected_B)
    h_B = beta * (lr_w - lr_l)
    loss_B = -(1 - label_smoothing) * F.logsigmoid(h_B) - label_smoothing * F.logsigmoid(-h_B)
    if weight_B is not None:
        loss_B = loss_B * weight_B
    return batch_mean(loss_B, denom), _pair_stats(beta * lr_w, beta * lr_l)


def ipo_loss(
    logp_chosen_B: torch.Tensor,
    logp_rejected_B: torch.Tensor,
    ref_logp_chosen_B: torch.Tensor,
    ref_logp_rejected_B: torch.Tensor,
    beta: float,
    denom: float | torch.Tensor | None = None,
    weight_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al.): the squared variant of Eq. 18 that does not push the margin to infinity,

        l = ( log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l) - 1 / (2 beta) )^2.

    Inputs as for ``dpo_loss``; beta plays the role of IPO's tau. Returns (loss, stats).
    """
    lr_w, lr_l = _logratio_margin(logp_chosen_B, logp_rejected_B, ref_logp_chosen_B, ref_logp_rejected_B)
    loss_B = (lr_w - lr_l - 1.0 / (2.0 * beta)).square()
    if weight_B is not None:
        loss_B = loss_B * weight_B
    return batch_mean(loss_B, denom), _pair_stats(beta * lr_w, beta * lr_l)


def _pair_stats(reward_w_B: torch.Tensor, reward_l_B: torch.Tensor) -> dict[str, torch.Tensor]:
    reward_w_B, reward_l_B = reward_w_B.detach(), reward_l_B.detach()
    return {
        "reward_chosen": reward_w_B,
        "reward_rejected": reward_l_B,
        "accuracy": (reward_w_B > reward_l_B).float().mean(),
        "margin": (reward_w_B - reward_l_B).mean(),
    }


def ppo_clip_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    denom: float | torch.Tensor | None = None,
    is_weight_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (seeds/004 Protocol 4, lines 5-6), per token:

        rho_t = pi(y_t) / pi_old(y_t)
        l_t   = -min( rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t )
        dual clip (Ye et al.), for A_t < 0 only:  l_t = min(l_t, -c A_t),  c > 1.
        behaviour correction:  l_t <- w_t l_t,  w_t = min(pi_old(y_t) / mu(y_t), C)  (is_weight_BT, constant)

    The last line is not in the seeds, which sample from pi_old itself: mu is the engine that sampled (one
    step older under async rollout, other kernels), pi_old the learner's proximal policy; truncated
    importance sampling as in AReaL's decoupled objective (Fu et al. 2025) and TIS (Yao et al. 2025).

    logp_BT, old_logp_BT: (B, T) log-probs under the current and the sampling policy; advantage_BT: (B, T)
    (broadcast a sequence advantage with ``adv_B[:, None]``); mask_BT: (B, T). Token-level mean.
    clip_eps_high defaults to clip_eps (DAPO's clip-higher when larger). The log ratio is clamped to
    +-20 before exp, so a wild token cannot overflow. denom: global token count for data-parallel ranks.
    Returns (loss, stats: clipfrac, approx_kl, ratio).
    On-policy (old_logp_BT = logp_BT.detach(), rho = 1) nothing clips and the gradient is REINFORCE's
    (seeds/004 Protocol 5, line 6), -A_t grad log pi(y_t), averaged over tokens: the reinforce, rloo and
    grpo algorithms run this way.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds the loss at -c*A for A < 0), got {dual_clip}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logp_BT.float() - old_logp_BT.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantage_BT.detach().float()
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss_BT = torch.maximum(loss_unclipped, loss_clipped)
    if dual_clip is not None:
        loss_BT = torch.where(adv < 0, torch.minimum(loss_BT, -dual_clip * adv), loss_BT)
    if is_weight_BT is not None:
        loss_BT = loss_BT * is_weight_BT.detach().float()
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask_BT),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask_BT),
            "ratio": masked_mean(ratio, mask_BT),
        }
    return masked_mean(loss_BT, mask_BT, denom=denom), stats


def value_loss(value_BT: torch.Tensor, old_value_BT: torch.Tensor, return_BT: torch.Tensor, mask_BT: torch.Tensor,
               clip: float = 0.0, denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Clipped value loss of the critic that PPO needs for token-level rewards (seeds/004 Sec. III-B,
    "Pros and Cons: PPO or REINFORCE?"); the squared error is L^VF of Schulman et al. 2017 (Eq. 9), the
    clipping that of their reference implementation (OpenAI baselines ppo2), per token:

        V^clip_t = V_old,t + clip(V_t - V_old,t, -c, c)
        l_t      = 0.5 * max( (V_t - R_t)^2, (V^clip_t - R_t)^2 )

    value_BT: (B, T) V_psi of the state before each response token (with grad); old_value_BT: (B, T) the
    values the advantages were computed from; return_BT: (B, T) the targets R_t = A_t + V_old,t
    (``gae_advantages``); mask_BT: (B, T) response tokens. Token-level mean (``masked_mean``).
    clip c = 0 gives the plain 0.5 * (V - R)^2. denom: global token count for data-parallel ranks.
    """
    value, ret = value_BT.float(), return_BT.float()
    err_BT = (value - ret).square()
    if clip > 0:
        clipped = old_value_BT.float() + (value - old_value_BT.float()).clamp(-clip, clip)
        err_BT = torch.maximum(err_BT, (clipped - ret).square())
    return 0.5 * masked_mean(err_BT, mask_BT, denom=denom)
