"""The math of afd_ray.algo against hand-derived numbers, masks, gradient directions and |logit| = 100."""

import math
import subprocess
import sys

import pytest
import torch

from afd_ray.algo.advantages import (
    gae_advantages,
    grpo_advantages,
    kl_shaped_reward,
    rloo_advantages,
    token_rewards,
)
from afd_ray.algo.kl import kl_per_token
from afd_ray.algo.losses import (
    bradley_terry_loss,
    discriminator_loss,
    dpo_loss,
    ipo_loss,
    pairwise_reward_loss,
    ppo_clip_loss,
    sft_loss,
    value_loss,
)
from afd_ray.algo.masked import masked_mean, token_logprobs
from afd_ray.algo.selection import BestOfNState, best_of_n, select_online_dpo_pairs


def t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float32, requires_grad=grad)


def softplus(x):  # -log sigmoid(-x), by hand
    return math.log1p(math.exp(x))


def test_algo_imports_without_heavy_frameworks():
    code = "import sys, afd_ray.algo.losses, afd_ray.algo.advantages, afd_ray.algo.selection, afd_ray.algo.kl; " \
           "print(sorted({'ray','vllm','deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- token log-probs and SFT -------------------------------------------------------------------------------

def test_token_logprobs_hand_and_stable():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    big = torch.tensor([[[100.0, -100.0, 0.0]]])
    lp = token_logprobs(big, torch.tensor([[1]]))
    assert torch.isfinite(lp).all() and lp.item() == pytest.approx(-200.0, abs=1e-3)


def test_sft_loss_hand_mask_and_reductions():
    logp = t(-1.0, -2.0, -9.0, -3.0).view(2, 2)
    mask = t(1.0, 1.0, 0.0, 1.0).view(2, 2)
    assert sft_loss(logp, mask).item() == pytest.approx((1 + 2 + 3) / 3)           # token mean
    assert sft_loss(logp, mask, "sequence").item() == pytest.approx((3 + 3) / 2)   # sum per seq, mean
    changed = logp.clone()
    changed[1, 0] = -1000.0  # a masked position never matters
    assert sft_loss(changed, mask).item() == pytest.approx(2.0)
    assert masked_mean(logp, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(logp, mask, "mean")


def test_sft_gradient_raises_demo_likelihood_and_stable():
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    loss = sft_loss(token_logprobs(logits, torch.tensor([[2]])), torch.ones(1, 1))
    loss.backward()
    assert logits.grad[0, 0, 2] < 0 and logits.grad[0, 0, 0] > 0  # descent raises the target logit
    far = torch.tensor([[[100.0, 0.0, -100.0]]], requires_grad=True)
    loss = sft_loss(token_logprobs(far, torch.tensor([[2]])), torch.ones(1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(far.grad).all()


# ---- reward losses -----------------------------------------------------------------------------------------

def test_bradley_terry_hand_margin_and_soft_labels():
    rw, rl = t(2.0, 0.0), t(1.0, 0.0)
    assert bradley_terry_loss(rw, rl).item() == pytest.approx((softplus(-1.0) + math.log(2)) / 2)
    assert bradley_terry_loss(rw, rl, margin=1.0).item() == pytest.approx((math.log(2) + softplus(1.0)) / 2)
    # soft label p = 0.5 on a gap d gives 0.5*(softplus(-d) + softplus(d))
    assert bradley_terry_loss(t(2.0), t(1.0), p_chosen_B=t(0.5)).item() == pytest.approx(
        0.5 * (softplus(-1.0) + softplus(1.0)))
    assert bradley_terry_loss(rw, rl, p_chosen_B=t(1.0, 1.0)).item() == pytest.approx(bradley_terry_loss(rw, rl).item())


def test_pairwise_reward_loss_gradient_and_stability():
    r_demo, r_pol = t(0.3, grad=True), t(0.5, grad=True)
    pairwise_reward_loss(r_demo, r_pol).backward()
    assert r_demo.grad.item() < 0 < r_pol.grad.item()  # descent raises r(y*) and lowers r(y')
    assert pairwise_reward_loss(t(0.3), t(0.5)).item() == pytest.approx(softplus(0.2))
    for a, b in [(100.0, -100.0), (-100.0, 100.0)]:
        x, y = t(a, grad=True), t(b, grad=True)
        loss = pairwise_reward_loss(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert pairwise_reward_loss(t(-100.0), t(100.0)).item() == pytest.approx(200.0, rel=1e-5)


def test_discriminator_bce_hand_gradient_stability():
    pos, neg = t(0.0, math.log(3.0), grad=True), t(0.0, grad=True)
    loss = discriminator_loss(pos, neg)
    expected = (math.log(2) + math.log(4 / 3)) / 2 + math.log(2)  # -mean log s(pos) - mean log(1 - s(neg))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (pos.grad < 0).all() and neg.grad.item() > 0
    p2, n2 = t(-100.0, grad=True), t(100.0, grad=True)
    loss = discriminator_loss(p2, n2)
    loss.backward()
    assert loss.item() == pytest.approx(200.0, rel=1e-5) and torch.isfinite(p2.grad).all()


def test_weighted_reward_losses_by_hand():
    """The per-pair weights the reward learner passes: AIHF's gamma * n / n_d and alpha * n / n_p give
    seeds/004 Eq. 24a, gamma * mean_demo(l) + alpha * mean_pref(l)."""
    # one demo pair (gap 1) and two preference pairs (gaps -2 and 0); n = 3, gamma 0.3, alpha 0.7
    chosen, rejected = t(1.0, 0.0, 0.0), t(0.0, 2.0, 0.0)
    w = t(0.3 * 3 / 1, 0.7 * 3 / 2, 0.7 * 3 / 2)
    eq24a = 0.3 * softplus(-1.0) + 0.7 * (softplus(2.0) + math.log(2)) / 2
    assert pairwise_reward_loss(chosen, rejected, weight_B=w).item() == pytest.approx(eq24a, rel=1e-6)
    # weight 0 drops a pair; with a margin m the gap is d - m
    assert pairwise_reward_loss(chosen, rejected, 1.0, weight_B=t(2.0, 0.0, 0.0)).item() == pytest.approx(
        2 * math.log(2) / 3)
    # discriminator: each example's weight scales its own BCE term
    d = discriminator_loss(t(0.0, math.log(3.0)), t(0.0), weight_pos_B=t(2.0, 0.0), weight_neg_B=t(3.0))
    assert d.item() == pytest.approx(2 * math.log(2) / 2 + 3 * math.log(2))


# ---- DPO / IPO / SPIN --------------------------------------------------------------------------------------

def test_dpo_hand_numbers_and_stats():
    loss, stats = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    # h = 0.5*(1) - 0.5*(-1) = 1
    assert loss.item() == pytest.approx(softplus(-1.0))
    assert stats["reward_chosen"].item() == pytest.approx(0.5) and stats["accuracy"].item() == 1.0
    smooth, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))


def test_weighted_dpo_and_ipo_by_hand_and_the_split_keeps_weights_with_their_pairs():
    """SPAC's per-pair weights (gamma on demonstration-vs-sample pairs, alpha on preference pairs)."""
    from afd_ray.types import PolicyBatch, SequenceBatch

    w, lw, ref = t(-1.0, -1.0), t(-3.0, -1.0), t(-2.0, -2.0)
    loss, _ = dpo_loss(w, lw, ref, ref, beta=0.5, weight_B=t(2.0, 0.0))
    assert loss.item() == pytest.approx(2.0 * softplus(-1.0) / 2)  # the second pair weighs nothing
    ipo, _ = ipo_loss(w, lw, ref, ref, beta=0.5, weight_B=t(0.0, 3.0))
    assert ipo.item() == pytest.approx(3.0 * (0.0 - 1.0) ** 2 / 2)
    seqs = SequenceBatch([[1]] * 8, [[k] for k in range(8)])
    demos = SequenceBatch([[1]] * 3, [[9]] * 3)
    batch = PolicyBatch("dpo", seqs, ref_seq_logp=torch.arange(8.0), pair_weight=t(1.0, 2.0, 3.0, 4.0),
                        sft_seqs=demos)
    a, b = batch.split(2)
    assert a.pair_weight.tolist() == [1.0, 2.0] and b.pair_weight.tolist() == [3.0, 4.0]
    assert a.ref_seq_logp.tolist() == [0.0, 1.0, 2.0, 3.0] and len(a.sft_seqs) + len(b.sft_seqs) == 3


def test_dpo_gradient_direction_and_stability():
    w, l = t(-5.0, grad=True), t(-5.0, grad=True)
    loss, _ = dpo_loss(w, l, t(-5.0), t(-5.0), beta=0.1)
    loss.backward()
    assert w.grad.item() < 0 < l.grad.item()
    w, l = t(-100.0, grad=True), t(100.0, grad=True)
    loss, _ = dpo_loss(w, l, t(100.0), t(-100.0), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(400.0, rel=1e-5) and torch.isfinite(w.grad).all()


def test_ipo_hand_gradient_stability():
    loss, _ = ipo_loss(t(-1.0), t(-2.0), t(-1.0), t(-1.0), beta=0.25)  # (1 - 2)^2
    assert loss.item() == pytest.approx(1.0)
    w, l = t(-1.0, grad=True), t(-1.0, grad=True)
    loss, _ = ipo_loss(w, l, t(-1.0), t(-1.0), beta=0.25)  # margin 0 < 1/(2 beta): push it up
    loss.backward()
    assert w.grad.item() < 0 < l.grad.item()
    loss, _ = ipo_loss(t(100.0), t(-100.0), t(-100.0), t(100.0), beta=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(399.5**2)


def test_spin_is_dpo_against_the_previous_iterate():
    # SPIN runs dpo_loss with the demonstration as winner, its own sample as loser and pi_t as reference
    loss, stats = dpo_loss(t(-2.0), t(-4.0), t(-3.0), t(-3.0), beta=1.0)  # h = 1 - (-1) = 2
    assert loss.item() == pytest.approx(softplus(-2.0))
    demo, own = t(-3.0, grad=True), t(-3.0, grad=True)
    dpo_loss(demo, own, t(-3.0), t(-3.0), beta=1.0)[0].backward()
    assert demo.grad.item() == pytest.approx(-0.5) and own.grad.item() == pytest.approx(0.5)  # -s(-0) = -1/2


# ---- KL ------------------------------------------------------------------------------------------------------

def test_kl_estimators_hand_numbers():
    lp, ref = t(-1.0, -2.0), t(-2.0, -1.0)  # log ratios 1, -1
    assert kl_per_token(lp, ref, "k1").tolist() == pytest.approx([1.0, -1.0])
    assert kl_per_token(lp, ref, "k2").tolist() == pytest.approx([0.5, 0.5])
    assert kl_per_token(lp, ref, "k3").tolist() == pytest.approx([math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1])
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(lp, ref, "k4")


def test_kl_estimators_are_unbiased_on_a_known_pair():
    # pi = [0.7, 0.3], pi_ref = [0.5, 0.5]; exact KL and E_pi[k] for k1, k3 match it exactly.
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        ek = (p * kl_per_token(p.log(), q.log(), est)).sum()
        assert ek.item() == pytest.approx(exact.item(), rel=1e-5)


def test_kl_gradient_and_stability_and_mask():
    lp = t(-1.0, -1.0, grad=True)
    mask = t(1.0, 0.0)
    masked_mean(kl_per_token(lp, t(-2.0, -2.0), "k3"), mask).backward()
    assert lp.grad[0] > 0 and lp.grad[1] == 0  # descent moves pi toward pi_ref; masked token untouched
    for est in ("k1", "k2", "k3"):
        x = t(100.0, -100.0, grad=True)
        v = kl_per_token(x, t(-100.0, 100.0), est)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(x.grad).all(), est


# ---- advantages and policy losses ---------------------------------------------------------------------------

def test_kl_shaped_reward_hand_and_mask():
    r = kl_shaped_reward(t(1.0, 2.0), t(-1.0, -1.0, -1.0, -1.0).view(2, 2), t(-2.0, -2.0, -1.0, -1.0).view(2, 2),
                         t(1.0, 0.0, 1.0, 1.0).view(2, 2), beta=0.1)
    assert r.tolist() == pytest.approx([1.0 - 0.1 * 1.0, 2.0])  # second token of row 0 masked
    big = kl_shaped_reward(t(0.0), t(100.0).view(1, 1), t(-100.0).view(1, 1), torch.ones(1, 1), beta=0.1, estimator="k3")
    assert torch.isfinite(big).all()


def test_rloo_hand_and_zero_sum():
    adv = rloo_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0), group_size=3)
    assert adv.tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0])
    assert adv.view(2, 3).sum(1).tolist() == pytest.approx([0.0, 0.0])
    assert torch.isfinite(rloo_advantages(t(100.0, -100.0), 2)).all()
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(t(1.0, 2.0, 3.0), 4)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(t(1.0, 2.0), 1)


def test_grpo_hand_and_constant_group():
    adv = grpo_advantages(t(1.0, 3.0, 4.0, 4.0), group_size=2)
    s = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], abs=1e-5)
    assert grpo_advantages(t(1.0, 3.0), 2, scale=False).tolist() == pytest.approx([-1.0, 1.0])
    assert torch.isfinite(grpo_advantages(t(100.0, -100.0), 2)).all()


def test_on_policy_ppo_is_reinforce_by_hand():
    """ratio 1 (old = logp.detach(), how reinforce / rloo / grpo run): the gradient is -A_t / (tokens)."""
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = t(1.0, 1.0, 1.0, 0.0).view(2, 2)  # 3 response tokens
    adv = t(1.0, 2.0)[:, None].expand(2, 2)
    loss, stats = ppo_clip_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1.0 + 1.0 + 2.0) / 3)
    loss.backward()
    assert logp.grad.view(-1).tolist() == pytest.approx([-1 / 3, -1 / 3, -2 / 3, 0.0])
    assert stats["clipfrac"].item() == 0.0 and stats["ratio"].item() == 1.0


def test_ppo_clip_hand_numbers():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo_clip_loss(new, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # token 0: min(1.5, 1.2) -> 1.2; token 1: min(0.5, 0.8) -> 0.5; token 2 (A<0): min(-1.1, -1.1) -> -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    higher, _ = ppo_clip_loss(new, old, adv, torch.ones(1, 3), clip_eps=0.2, clip_eps_high=0.6)
    assert higher.item() == pytest.approx(-(1.5 + 0.5 - 1.1) / 3, rel=1e-5)


def test_ppo_dual_clip_bounds_negative_advantage():
    new, old = torch.log(torch.tensor([[10.0]])), torch.zeros(1, 1)
    adv = torch.tensor([[-1.0]])
    plain, _ = ppo_clip_loss(new, old, adv, torch.ones(1, 1))
    dual, _ = ppo_clip_loss(new, old, adv, torch.ones(1, 1), dual_clip=3.0)
    assert plain.item() == pytest.approx(10.0, rel=1e-5) and dual.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(new, old, adv, torch.ones(1, 1), dual_clip=0.5)


def test_ppo_gradient_mask_stability():
    new = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_clip_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert new.grad[0, 0] < 0 and new.grad[0, 1] == 0
    wild = torch.tensor([[100.0, -100.0]], requires_grad=True)
    loss, stats = ppo_clip_loss(wild, torch.tensor([[-100.0, 100.0]]), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                                dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(wild.grad).all() and all(torch.isfinite(v) for v in stats.values())


def test_value_loss_by_hand_clipped_and_unclipped():
    # c = 0.2; token 2 is padding (mask 0) with a huge target that must not count
    v = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.5, 1.5, 0.5]])
    ret = torch.tensor([[2.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: (V - R)^2 = (1 - 2)^2 = 1; V_clip = 0.5 + clip(0.5) = 0.7, (0.7 - 2)^2 = 1.69 -> clipped wins
    # token 1: (V - R)^2 = (2 - 1)^2 = 1; V_clip = 1.5 + clip(0.5) = 1.7, (1.7 - 1)^2 = 0.49 -> unclipped wins
    loss = value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    loss.backward()
    # token 0's loss is the clipped one, flat in V; token 1: d/dV 0.5 * (V - R)^2 / 2 = (2 - 1) / 2
    assert v.grad[0].tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert value_loss(v, old, ret, mask).item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)  # c = 0: plain MSE
    assert value_loss(v, old, ret, mask, clip=0.2, denom=4.0).item() == pytest.approx(0.5 * 2.69 / 4)


# ---- selection ---------------------------------------------------------------------------------------------

def test_online_dpo_pairs_best_vs_worst():
    sel = select_online_dpo_pairs(t(0.1, 0.9, -0.5, 2.0, 2.0, 2.0), group_size=3)
    assert sel.chosen_P.tolist() == [1, 3] and sel.rejected_P.tolist() == [2, 3]
    assert sel.valid_P.tolist() == [True, False]  # a constant group carries no preference
    sel = select_online_dpo_pairs(t(100.0, -100.0), 2)
    assert sel.chosen_P.tolist() == [0] and sel.valid_P.all()
    with pytest.raises(ValueError, match="n >= 2"):
        select_online_dpo_pairs(t(1.0, 2.0), 1)


def test_best_of_n_prefix_and_n1_is_plain_sampling():
    r = torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 2.0, 7.0, 1.0]])
    assert best_of_n(r).tolist() == [3, 2]
    assert best_of_n(r, 2).tolist() == [1, 0]
    assert best_of_n(r, 1).tolist() == [0, 0]
    with pytest.raises(ValueError, match="n must be in"):
        best_of_n(r, 5)


def test_best_of_n_streamed_equals_whole():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 12, generator=g)
    r[0, 3] = r[0, 7] = 10.0  # a tie: the earlier sample wins both ways
    state = BestOfNState.empty(5)
    for chunk in r.split(5, dim=1):
        state.update(chunk)
    assert state.index_P.tolist() == best_of_n(r).tolist() and state.seen == 12
    assert torch.equal(state.reward_P, r.max(1).values)


def test_bradley_terry_gradient_and_stability():
    w, l = t(0.0, grad=True), t(1.0, grad=True)
    bradley_terry_loss(w, l, p_chosen_B=t(0.9)).backward()
    assert w.grad.item() < 0 < l.grad.item()  # descent raises the preferred response's reward
    big = bradley_terry_loss(t(-100.0), t(100.0), p_chosen_B=t(0.5))
    assert torch.isfinite(big) and big.item() == pytest.approx(100.0 + math.log(2) - math.log(2), rel=1e-3)


def test_group_advantages_rank_by_reward_and_carry_no_gradient():
    r = t(0.0, 1.0, 5.0, 2.0, grad=True)
    for adv in (rloo_advantages(r, 4), grpo_advantages(r, 4)):
        assert not adv.requires_grad  # a baseline is a fixed target, not something to differentiate
        assert adv.argsort().tolist() == [0, 1, 3, 2]  # higher reward, higher advantage
    assert kl_shaped_reward(t(1.0, grad=True), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.1).requires_grad is False


def test_global_denominator_makes_shards_sum_to_the_full_loss():
    """Data-parallel ranks pass the global count: the shard losses then add up to the full-batch loss."""
    g = torch.Generator().manual_seed(0)
    logp, mask, adv = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float(), torch.randn(6, generator=g)
    full, _ = ppo_clip_loss(logp, logp, adv[:, None].expand(6, 5), mask)
    n = mask.sum()
    shards = sum(ppo_clip_loss(logp[i::2], logp[i::2], adv[i::2, None].expand(3, 5), mask[i::2], denom=n)[0]
                 for i in range(2))
    assert shards.item() == pytest.approx(full.item(), rel=1e-6)
    full_dpo, _ = dpo_loss(logp[:, 0], logp[:, 1], logp[:, 2], logp[:, 3], beta=0.5)
    parts = sum(dpo_loss(logp[i::3, 0], logp[i::3, 1], logp[i::3, 2], logp[i::3, 3], beta=0.5, denom=6)[0]
                for i in range(3))
    assert parts.item() == pytest.approx(full_dpo.item(), rel=1e-6)
    # the reward learner's losses: micro-batches with denom = pair count add up to the full-batch loss
    w = torch.rand(6, generator=g)
    full_pw = pairwise_reward_loss(logp[:, 0], logp[:, 1], 0.5, weight_B=w)
    parts = sum(pairwise_reward_loss(logp[i::3, 0], logp[i::3, 1], 0.5, weight_B=w[i::3], denom=6) for i in range(3))
    assert parts.item() == pytest.approx(full_pw.item(), rel=1e-6)
    full_d = discriminator_loss(logp[:, 0], logp[:, 1], weight_pos_B=w, weight_neg_B=w)
    parts = sum(discriminator_loss(logp[i::3, 0], logp[i::3, 1], 6, 6, weight_pos_B=w[i::3], weight_neg_B=w[i::3])
                for i in range(3))
    assert parts.item() == pytest.approx(full_d.item(), rel=1e-6)


def test_gae_by_hand():
    # one sequence of 3 tokens, gamma 1, lambda 0.5; rewards (0, 0, 1), values (0.5, 0.25, 0.75)
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.75]]), torch.ones(1, 3)
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    d = [0 + 0.25 - 0.5, 0 + 0.75 - 0.25, 1 + 0 - 0.75]  # delta_t = r_t + V_{t+1} - V_t
    want = [d[0] + 0.5 * d[1] + 0.25 * d[2], d[1] + 0.5 * d[2], d[2]]
    assert adv[0].tolist() == pytest.approx(want)
    assert ret[0].tolist() == pytest.approx([a + b for a, b in zip(want, [0.5, 0.25, 0.75])])
    # lambda = 1, gamma = 1: the advantage is the return-to-go minus V (Monte Carlo)
    adv1, _ = gae_advantages(r, v, m, 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([1 - 0.5, 1 - 0.25, 1 - 0.75])


def test_gae_ignores_padding_after_the_response():
    r = torch.tensor([[0.0, 2.0, 9.0], [0.0, 0.0, 1.0]])
    v = torch.tensor([[1.0, 1.0, 9.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([2 - 1, 2 - 1, 0.0])  # position 2 (padding) neither adds nor counts
    assert ret[0, 2] == 0


def test_token_rewards_put_r_at_the_last_token_and_the_kl_everywhere():
    logp, ref = torch.tensor([[-1.0, -1.0, 0.0]]), torch.tensor([[-2.0, -1.5, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    r = token_rewards(torch.tensor([3.0]), logp, ref, m, beta=0.1, estimator="k1")
    assert r[0].tolist() == pytest.approx([-0.1, -0.05 + 3.0, 0.0])
