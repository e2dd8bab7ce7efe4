"""The baselines end to end on real actors (toy task): each moves its own objective the expected way."""

import pytest

from afd_ray.config import load_config
from afd_ray.run import run

pytestmark = pytest.mark.slow


def toy(tmp_path, name, *overrides):
    return load_config("toy", [f"run.output_dir={tmp_path}", f"run.name={name}", "data.preferences=toy",
                               *overrides])


def first_last(rd, key):
    ms = [m for m in rd.metrics() if key in m]
    return ms[0][key], ms[-1][key]


@pytest.mark.parametrize("method, lr", [("dpo", 1e-3), ("ipo", 2e-4)])  # IPO's squared loss takes a smaller step
def test_dpo_and_ipo_raise_held_out_implicit_reward_accuracy(ray_local, toy_sft, tmp_path, method, lr, tokenizer):
    rd = run(toy(tmp_path, method, f"run.method={method}", f"model.policy={toy_sft}", "run.iterations=8",
                 "policy.pairs_per_step=64", f"policy.lr={lr}", "policy.micro_batch_size=128",
                 "policy.dpo_beta=0.5"), echo=lambda *_: None)
    loss0, loss1 = first_last(rd, "policy/loss")
    acc0, acc1 = first_last(rd, "heldout/implicit_reward_accuracy")
    assert loss1 < loss0, (loss0, loss1)
    assert acc1 > 0.6 and acc1 > acc0, (acc0, acc1)
    assert (rd.path / "policy" / "model.safetensors").is_file()
    # the saved policy, scored by afd_ray.eval: beta*log(pi/pi_SFT) ranks unseen golden-ordered pairs
    from afd_ray.eval.accuracy import implicit_reward_accuracy, load_preference_pairs

    pairs, subsets = load_preference_pairs("toy", tokenizer, limit=128)
    acc = implicit_reward_accuracy(str(rd.path / "policy"), str(toy_sft), 0.5, pairs, subsets, tokenizer.pad_token_id)
    assert acc["accuracy"] > 0.6, acc


def test_bt_reward_model_learns_held_out_preferences(ray_local, toy_sft, tmp_path):
    rd = run(toy(tmp_path, "bt", "run.method=bt_rm", f"model.policy={toy_sft}", "run.iterations=12",
                 "reward.lr=1e-3", "reward.batch_size=64"), echo=lambda *_: None)
    loss0, loss1 = first_last(rd, "reward/loss")
    acc = rd.metrics()[-1]["heldout/preference_accuracy"]
    assert loss1 < loss0 and acc > 0.65, (loss0, loss1, acc)
    assert (rd.path / "reward_model" / "config.json").is_file()


def test_one_spin_iteration_ranks_demonstrations_above_own_samples(ray_local, toy_sft, tmp_path):
    rd = run(toy(tmp_path, "spin", "run.method=spin", f"model.policy={toy_sft}", "run.iterations=1",
                 "rollout.n=1", "policy.lr=1e-3", "policy.dpo_beta=0.5", "policy.mini_batches=2",
                 "rollout.prompts_per_iteration=64"), echo=lambda *_: None)
    (m,) = rd.metrics()
    # beta*log(pi_1/pi_0): demonstration vs the policy's own sample on held-out prompts
    assert m["heldout/implicit_reward_accuracy"] > 0.5 and m["heldout/implicit_reward_margin"] > 0, m
    assert m["sync/sync_logprob_diff"] < 1e-3


def test_aihf_mixes_preferences_into_the_reward_step(ray_local, toy_sft, tmp_path):
    rd = run(toy(tmp_path, "aihf", "run.method=aihf", f"model.policy={toy_sft}", "run.iterations=3",
                 "rollout.prompts_per_iteration=32", "reward.epochs=2", "reward.updates_per_iteration=0",
                 "reward.lr=1e-3", "data.heldout=64"),
             echo=lambda *_: None)
    ms = rd.metrics()
    assert [m["iteration"] for m in ms] == [1.0, 2.0, 3.0]
    # every demo-pair batch is joined by as many preference pairs (128 new demo pairs per iteration, replayed)
    assert [m["preference_pairs"] for m in ms] == [2 * 128.0, 2 * 256.0, 2 * 384.0]
    losses = [m["reward/loss"] for m in ms]  # Eq. 24a: gamma * demo-pair loss + alpha * preference-pair loss
    assert losses[-1] < losses[0], losses
    assert ms[-1]["heldout/reward_accuracy"] > 0.6 and "heldout/preference_accuracy" in ms[-1]


@pytest.mark.parametrize("form, overrides", [("rpo", ("run.iterations=6",)),
                                             ("spac", ("run.iterations=3", "rollout.n=2"))])
def test_aihf_special_cases_rpo_and_spac_learn_the_preferences(ray_local, toy_sft, tmp_path, form, overrides):
    """seeds/004 after Eq. 24: the policy is the reward. rpo: the demonstrations' NLL plus DPO on preference
    pairs in one step; spac: demonstration-vs-own-sample pairs beside the preference pairs, as DPO pairs."""
    rd = run(toy(tmp_path, form, "run.method=aihf", f"run.aihf_form={form}", f"model.policy={toy_sft}",
                 "policy.pairs_per_step=64", "policy.lr=1e-3", "policy.micro_batch_size=64", "policy.dpo_beta=0.5",
                 "rollout.prompts_per_iteration=32", *overrides), echo=lambda *_: None)
    ms = rd.metrics()
    acc0, acc1 = first_last(rd, "heldout/implicit_reward_accuracy")
    assert acc1 > 0.6 and acc1 > acc0, (acc0, acc1)
    if form == "rpo":  # the demonstrations' NLL is in the loss, and falls while the preferences are learned
        assert ms[-1]["policy/demo_nll"] < ms[0]["policy/demo_nll"], [m["policy/demo_nll"] for m in ms]
    else:  # sampled from pi_t, then the new weights reached the engines
        assert "policy/demo_nll" not in ms[-1] and max(m["sync/sync_logprob_diff"] for m in ms) < 1e-3
        assert "golden/heldout_policy" in ms[-1]
    assert (rd.path / "policy" / "model.safetensors").is_file()


def test_a_stopped_dpo_run_resumes_and_reproduces_the_uninterrupted_run(ray_local, toy_sft, tmp_path):
    args = ("run.method=dpo", f"model.policy={toy_sft}", "run.iterations=4", "policy.pairs_per_step=32",
            "policy.lr=1e-3", "policy.micro_batch_size=64", "run.checkpoint_every=2")
    full = run(toy(tmp_path, "full", *args), echo=lambda *_: None).metrics()
    part = run(toy(tmp_path, "part", *args, "run.stop_after=3"), echo=lambda *_: None)
    assert [m["iteration"] for m in part.metrics()] == [1.0, 2.0, 3.0]
    assert not (part.path / "report.md").exists() and part.latest().iteration == 3  # the stop point is checkpointed
    resumed = run(None, resume=part.path, echo=lambda *_: None)
    assert [m["iteration"] for m in resumed.metrics()] == [1.0, 2.0, 3.0, 4.0]
    for a, b in zip(full, resumed.metrics()):
        for k in ("policy/loss", "policy/grad_norm", "heldout/implicit_reward_accuracy"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    assert (resumed.path / "policy" / "model.safetensors").is_file() and (resumed.path / "report.md").is_file()
