"""End to end on real actors with the toy task: one alternation, stop and resume, and learning."""

import json
import statistics

import pytest

from afd_ray.config import load_config
from afd_ray.run import run

pytestmark = pytest.mark.slow

# metrics that must repeat exactly on CPU when a run is resumed (timings excluded)
REPRODUCED = ("rollout/reward", "rollout/kl", "policy/loss", "policy/grad_norm", "reward/loss",
              "heldout/reward_accuracy", "golden/heldout_policy", "replay_pairs")


def toy_cfg(sft, out, name, *overrides):
    return load_config("toy", [f"model.policy={sft}", f"run.output_dir={out}", f"run.name={name}", *overrides])


def test_one_alternation_writes_checkpoints_metrics_report(ray_local, toy_sft, tmp_path):
    rd = run(toy_cfg(toy_sft, tmp_path, "one", "run.iterations=2", "rollout.prompts_per_iteration=8",
                     "reward.replay_window=-1"), echo=lambda *_: None)
    ms = rd.metrics()
    assert [m["iteration"] for m in ms] == [1.0, 2.0]
    assert [m["replay_pairs"] for m in ms] == [32.0, 64.0]  # 8 prompts x 4 samples per iteration, all replayed
    assert all(0.0 <= m["heldout/reward_accuracy"] <= 1.0 for m in ms)
    assert all(m["sync/sync_logprob_diff"] < 1e-3 for m in ms)
    last = rd.ckpt / "iter_000002"
    assert json.loads((rd.ckpt / "latest.json").read_text()) == {"iteration": 2}
    for part in ("policy/config.json", "policy/model.safetensors", "reward/config.json", "policy_state",
                 "reward_state", "loop.pt"):
        assert (last / part).exists(), part
    assert not (rd.ckpt / "iter_000001").exists()  # keep_checkpoints=1
    report = (rd.path / "report.md").read_text()
    assert "Time per phase" in report and "final/heldout_policy" in report


def test_stop_and_resume_reproduces_the_uninterrupted_run(ray_local, toy_sft, tmp_path):
    args = ("run.iterations=4", "rollout.prompts_per_iteration=8", "data.heldout=16")
    full = run(toy_cfg(toy_sft, tmp_path, "full", *args), echo=lambda *_: None).metrics()
    part = run(toy_cfg(toy_sft, tmp_path, "part", *args, "run.stop_after=2"), echo=lambda *_: None)
    assert [m["iteration"] for m in part.metrics()] == [1.0, 2.0]
    assert not (part.path / "report.md").exists()
    resumed = run(None, resume=part.path, echo=lambda *_: None).metrics()
    assert [m["iteration"] for m in resumed] == [1.0, 2.0, 3.0, 4.0]
    for a, b in zip(full, resumed):
        for k in REPRODUCED:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)


def golden_gain(tmp_path, sft, name, *overrides):
    """(golden reward of pi_SFT's held-out samples, of the final IRL policy's) on the toy task."""
    rd = run(toy_cfg(sft, tmp_path, name, *overrides), echo=lambda *_: None)
    ms = rd.metrics()
    report = (rd.path / "report.md").read_text()
    final = float(report.split("final/heldout_policy: ")[1].split()[0])
    assert statistics.mean(m["heldout/reward_accuracy"] for m in ms[-3:]) > 0.6  # the RM tells demos apart
    return ms[0]["golden/heldout_policy"], final  # iteration 1 samples come from pi_SFT, before any update


def test_toy_irl_rloo_beats_sft_on_golden_reward(ray_local, toy_sft, tmp_path):
    sft, irl = golden_gain(tmp_path, toy_sft, "rloo", "policy.algo=rloo")
    assert irl > sft + 0.08, f"rloo: golden reward {sft:.3f} (SFT) -> {irl:.3f} (IRL)"


@pytest.mark.xfail(strict=False, reason=(
    "online_dpo does not yet beat SFT by the margin on the toy task: 23 settings tried (docs/LOG.md) end "
    "-0.22 to +0.08 against SFT after 12-15 iterations, peaking mid-run before the reward model overfits"))
def test_toy_irl_online_dpo_beats_sft_on_golden_reward(ray_local, toy_sft, tmp_path):
    sft, irl = golden_gain(tmp_path, toy_sft, "online_dpo", "policy.algo=online_dpo", "policy.lr=5e-4",
                           "policy.mini_batches=2")
    assert irl > sft + 0.08, f"online_dpo: golden reward {sft:.3f} (SFT) -> {irl:.3f} (IRL)"
