"""Driver logic with named fakes (no Ray): pairs, replay window, credit assignment, phases, cursor."""

import math

import pytest
import torch

from afd_ray.algo.credit import policy_batch
from afd_ray.algo.losses import pairwise_reward_loss
from afd_ray.config import load_config
from afd_ray.data.tokenize import Encoded, EncodedPreference
from afd_ray.driver import Collaborators, LoopState, irl_iteration, mix_preferences
from afd_ray.replay import DataCursor, PairReplay
from afd_ray.types import PairBatch, Samples, SamplingSpec, SequenceBatch


class FakeRollout:
    """Answers prompt p with n responses [p[0], j] (j = sample index); log-probs -1 per token."""

    def generate(self, prompt_ids, spec):
        responses = [[p[0], j] for p in prompt_ids for j in range(spec.n)]
        return Samples([list(p) for p in prompt_ids], responses, [[-1.0, -1.0] for _ in responses], spec.n)

    def generate_many(self, requests):
        return [self.generate(*r) for r in requests]

    def sleep(self):
        pass


class FakeReward:
    """Scores a response by its last token; records every pair batch it was trained on."""

    def __init__(self):
        self.batches = []

    def update(self, pairs, loss, margin):
        self.batches.append(pairs)
        return {"loss": 0.5}

    def score(self, seqs):
        return torch.tensor([float(r[-1]) for r in seqs.responses])

    submit_score = score  # a fake answers at once; gather passes results through


class FakeReference:
    def logprobs(self, seqs):
        return [[-1.5] * len(r) for r in seqs.responses]

    submit_logprobs = logprobs


class FakePolicy:
    def __init__(self):
        self.batches = []

    def update(self, batch):
        self.batches.append(batch)
        return {"loss": 0.1, "grad_norm": 1.0}

    def logprobs(self, seqs):
        return [[-1.0] * len(r) for r in seqs.responses]

    submit_logprobs = logprobs


def demos(k=10):
    return [Encoded([100 + i, 7], [50 + i, 2], False, "fake", i) for i in range(k)]


def fakes():
    return Collaborators(rollout=FakeRollout(), policy=FakePolicy(), reward=FakeReward(), reference=FakeReference(),
                         sync=lambda: {"sync_seconds": 0.0}, golden=lambda p, r: [1.0] * len(r))


def test_iteration_pairs_demo_against_own_samples_and_replays():
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "reward.replay_window=2", "reward.batch_size=100"])
    d, c = demos(), fakes()
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    sizes = []
    for t in (1, 2, 3):
        m = irl_iteration(t, cfg, d, d[:2], c, state)
        sizes.append(m["replay_pairs"])
    assert sizes == [6.0, 12.0, 12.0]  # window of 2 iterations: the oldest drops out at t = 3
    last = c.reward.batches[-1]
    for prompt, chosen, rejected in zip(last.chosen.prompts, last.chosen.responses, last.rejected.responses):
        demo = next(x for x in d if x.prompt_ids == prompt)
        assert chosen == demo.response_ids and rejected[0] == prompt[0]  # demo y* vs the policy's own y'
    assert state.iteration == 3 and len(state.replay.pairs) == 18
    assert {"heldout/reward_accuracy", "heldout/reward_gap", "golden/heldout_policy", "time/rollout",
            "time/policy", "time/sync", "policy/loss", "rollout/kl"} <= set(m)
    assert m["heldout/reward_accuracy"] == 1.0  # fake rewards: demo's last token 2 > sample's last token 0


def test_reward_updates_per_iteration_bound_the_step_and_take_the_newest_pairs_first():
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "reward.batch_size=4", "reward.updates_per_iteration=2"])
    d, c = demos(), fakes()
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    for t in range(1, 6):
        c.reward.batches.clear()
        m = irl_iteration(t, cfg, d, d[:2], c, state)
        assert [len(b) for b in c.reward.batches] == ([4, 2] if t == 1 else [4, 4])  # 6 pairs, then 2 x 4
        assert m["replay_pairs"] == 6.0 * t and m["reward/pairs"] == (6.0 if t == 1 else 8.0)
        seen = [(p, r) for b in c.reward.batches for p, r in zip(b.rejected.prompts, b.rejected.responses)]
        newest = [(p, r) for it, i, r in state.replay.pairs if it == t for p in [d[i].prompt_ids]]
        assert all(x in seen for x in newest)  # this iteration's 6 pairs, plus 2 drawn from earlier ones
    # updates_per_iteration = 0: a pass over the whole growing window
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "reward.batch_size=4", "reward.updates_per_iteration=0"])
    c.reward.batches.clear()
    m = irl_iteration(6, cfg, d, d[:2], c, state)
    assert m["reward/pairs"] == m["replay_pairs"] == 36.0 and len(c.reward.batches) == 9
    # the default, -1: four times this iteration's batches (6 new pairs = 2 batches of 4 -> 8 batches)
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "reward.batch_size=4"])
    assert cfg.reward.updates_per_iteration == -1
    c.reward.batches.clear()
    m = irl_iteration(7, cfg, d, d[:2], c, state)
    assert m["replay_pairs"] == 42.0 and m["reward/pairs"] == 32.0 and len(c.reward.batches) == 8


def test_replay_window_all_and_newest():
    r = PairReplay()
    for t in (1, 2, 3):
        r.add(t, [0], [[t]])
    assert len(r.window(3, -1)) == 3 and [p[0] for p in r.window(3, 0)] == [3] and len(r.window(3, 2)) == 2


def test_cursor_is_resumable_and_covers_each_epoch():
    a = DataCursor(7, seed=3)
    first = a.take(7)
    assert sorted(first) == list(range(7))
    b = DataCursor(7, seed=3, epoch=a.epoch, pos=a.pos)
    assert a.take(5) == b.take(5)


def samples(rewards_n=2):
    return Samples([[1], [2]], [[10, 11], [12], [13, 14], [15]], [[-1.0, -1.0], [-2.0], [-1.0, -1.0], [-0.5]], rewards_n)


def test_credit_rloo_folds_kl_into_reward():
    ref = [[-1.5, -1.5], [-2.0], [-1.0, -1.0], [-0.5]]  # k1 sums: 1.0, 0.0, 0.0, 0.0
    batch, stats = policy_batch("rloo", samples(), torch.tensor([1.0, 0.0, 2.0, 2.0]), ref, beta=0.5)
    # shaped: [0.5, 0.0, 2.0, 2.0]; RLOO with n = 2: [0.5, -0.5, 0, 0]
    assert batch.objective == "pg" and batch.advantages.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert stats["kl"] == 0.25 and batch.kl_coef == 0.0


def test_credit_grpo_kl_in_loss_and_online_dpo_pairs():
    ref = [[-1.0, -1.0], [-2.0], [-1.0, -1.0], [-0.5]]
    batch, _ = policy_batch("grpo", samples(), torch.tensor([1.0, 0.0, 2.0, 2.0]), ref, beta=0.1, kl_in_reward=False)
    assert batch.kl_coef == 0.1 and batch.kl_estimator == "k3" and batch.advantages[2:].tolist() == [0.0, 0.0]
    batch, stats = policy_batch("online_dpo", samples(), torch.tensor([1.0, 3.0, 2.0, 2.0]), ref, beta=0.1)
    # prompt 0: best = sample 1, worst = sample 0; prompt 1: tie -> no pair
    assert batch.objective == "dpo" and batch.seqs.responses == [[12], [10, 11]] and stats["dpo_pairs"] == 1.0
    assert batch.ref_seq_logp.tolist() == [-2.0, -2.0]


def test_reward_warmup_skips_the_policy_step_and_sync():
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=2", "rollout.n=2",
                              "reward.warmup_iterations=1"])
    d, c = demos(), fakes()
    syncs = []
    c.sync = lambda: syncs.append(1) or {"sync_seconds": 0.0}
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    m1 = irl_iteration(1, cfg, d, d[:2], c, state)
    assert not c.policy.batches and not syncs and "policy/loss" not in m1 and len(c.reward.batches) == 1
    irl_iteration(2, cfg, d, d[:2], c, state)
    assert len(c.policy.batches) == cfg.policy.mini_batches and syncs == [1]


def test_aihf_pair_weights_make_the_reward_loss_eq_24a():
    """The batch the reward learner gets under AIHF, through the loss it runs, is seeds/004 Eq. 24a."""
    demo = PairBatch(SequenceBatch([[1]], [[10]]), SequenceBatch([[1]], [[11]]))
    prefs = [EncodedPreference([2], [12], [13]), EncodedPreference([3], [14], [15])]
    pairs = mix_preferences(demo, prefs, gamma=0.3, alpha=0.7)
    assert pairs.chosen.prompts == [[1], [2], [3]] and pairs.rejected.responses == [[11], [13], [15]]
    reward = {10: 1.0, 11: 0.0, 12: 0.0, 13: 2.0, 14: 0.0, 15: 0.0}  # gaps: demo 1; preferences -2 and 0

    def score(seqs):
        return torch.tensor([reward[r[0]] for r in seqs.responses])

    loss = pairwise_reward_loss(score(pairs.chosen), score(pairs.rejected), weight_B=pairs.weight)
    # gamma * -log s(1) + alpha * mean(-log s(-2), -log s(0))
    want = 0.3 * math.log1p(math.exp(-1.0)) + 0.7 * (math.log1p(math.exp(2.0)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


class Done:
    """What a submit hands back, already answered (the real one is a ``Pending`` of actor calls)."""

    def __init__(self, answers):
        self.answers = answers

    def then(self, convert):
        return Done(convert(self.answers))

    def result(self):
        return self.answers


def test_async_rollout_samples_the_next_prompts_during_the_step_and_syncs_before_sampling():
    overrides = ["model.policy=x", "rollout.prompts_per_iteration=2", "rollout.n=2", "run.iterations=3"]
    d = demos()

    def loop(*extra):
        cfg = load_config("toy", overrides + list(extra))
        c, log = fakes(), []
        c.sync = lambda: log.append("sync") or {"sync_seconds": 0.0}
        now = c.rollout.generate_many
        c.rollout.generate_many = lambda reqs: log.append(("now", reqs[0][1].seed)) or now(reqs)
        c.rollout.submit_many = lambda reqs: log.append(("ahead", reqs[0][1].seed)) or Done(now(reqs))
        state = LoopState(cursor=DataCursor(len(d), seed=0))
        return [irl_iteration(t, cfg, d, d[:2], c, state) for t in (1, 2, 3)], c, log, state

    ms, c, log, state = loop("run.async_rollout=true")
    # iteration t samples t+1's prompts after bringing the engines up to the learner, and trains on what
    # was sampled during iteration t-1: one policy step off
    assert log == [("now", 1), ("ahead", 2), "sync", ("ahead", 3), "sync"]
    assert [m["rollout/policy_lag"] for m in ms] == [0.0, 1.0, 1.0]
    assert state.ahead is None and state.engines_behind  # the last step's sync waits for the next sampler
    assert all(b.is_weight is not None for b in c.policy.batches)  # pi_old / pi_engine on every pg batch
    sync_ms, sync_c, sync_log, _ = loop()
    assert sync_log == [("now", 1), "sync", ("now", 2), "sync", ("now", 3), "sync"]
    # the same prompts in the same order, with the same seeds, as the synchronous loop
    assert [b.seqs.prompts for b in c.policy.batches] == [b.seqs.prompts for b in sync_c.policy.batches]


def test_async_loop_state_keeps_the_samples_drawn_ahead(tmp_path):
    from afd_ray.driver import Ahead
    from afd_ray.methods.irl import load_loop_state, save_loop_state
    from afd_ray.runtime.guard import NonFiniteGuard

    d, c = demos(), fakes()
    answers = c.rollout.generate_many([([[1, 2], [3]], SamplingSpec(n=2, seed=5)), ([[4]], SamplingSpec(n=1))])
    state = LoopState(cursor=DataCursor(len(d), seed=0), ahead=Ahead([3, 4], Done(answers), steps=2),
                      policy_steps=3, engines_behind=True)
    save_loop_state(tmp_path, state, 7, NonFiniteGuard(3))
    loaded, _ = load_loop_state(tmp_path, 7)
    assert loaded.ahead.idx == [3, 4] and loaded.ahead.result() == tuple(answers) and loaded.ahead.steps == 2
    assert loaded.policy_steps == 3
    assert not loaded.engines_behind  # the engines start from the checkpoint's policy


def test_credit_importance_weights_are_truncated_and_the_kl_is_the_learners():
    ref = [[-1.5, -1.5], [-2.0], [-1.0, -1.0], [-0.5]]
    old = [[-1.0, -0.5], [-2.0], [-1.0, 1.0], [-0.5]]  # the learner's log-probs; the engine's: samples()
    batch, stats = policy_batch("rloo", samples(), torch.tensor([1.0, 0.0, 2.0, 2.0]), ref, beta=0.5,
                                old_logp=old, importance_cap=2.0)
    w = batch.is_weight
    assert w[0] == pytest.approx([1.0, math.exp(0.5)]) and w[1] == [1.0] and w[2] == [1.0, 2.0] and w[3] == [1.0]
    assert stats["is_truncated"] == pytest.approx(1 / 6)  # exp(2) capped at 2
    assert stats["kl"] == pytest.approx((1.5 + 0.0 + 2.0 + 0.0) / 4)  # sum_t (old - ref) per sequence, mean
    assert [len(p.is_weight) for p in batch.split(2)] == [2, 2]
    off, _ = policy_batch("rloo", samples(), torch.tensor([1.0, 0.0, 2.0, 2.0]), ref, beta=0.5, old_logp=old)
    assert off.is_weight is None  # importance_cap = 0: the samples are taken as pi_old's own


def test_ppo_loss_scales_each_token_by_its_importance_weight():
    from afd_ray.algo.losses import ppo_clip_loss

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, mask = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    plain, _ = ppo_clip_loss(logp, logp.detach(), adv, mask)
    weighted, _ = ppo_clip_loss(logp, logp.detach(), adv, mask, is_weight_BT=torch.tensor([[2.0, 0.5]]))
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-1.25)
    (g,) = torch.autograd.grad(weighted, logp)
    assert g[0].tolist() == pytest.approx([-1.0, -0.25])  # -w_t A_t / T
