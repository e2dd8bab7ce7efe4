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
from afd_ray.types import PairBatch, Samples, SequenceBatch


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
                              "reward.batch_size=4"])
    c.reward.batches.clear()
    m = irl_iteration(6, cfg, d, d[:2], c, state)
    assert m["reward/pairs"] == m["replay_pairs"] == 36.0 and len(c.reward.batches) == 9


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
