"""Faults through the command line, as a user meets them (docs/RELIABILITY.md): a stopped run resumed and
extended, the driver SIGKILLed while committing a checkpoint, a rollout engine and a learner rank killed,
an engine hung, NaN in the reward model's output and in the synced weights. Faults are injected inside
the real processes (afd_ray.faults); every run is `jobs/irl_ultrachat.py` in its own process with its own
Ray instance, compared with one uninterrupted run of the same config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afd_ray import faults

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "irl_ultrachat.py"
# metrics that must repeat exactly on CPU after a resume or a recovery (timings excluded)
REPRODUCED = ("rollout/reward", "rollout/kl", "policy/loss", "policy/grad_norm", "policy/lr", "reward/loss",
              "heldout/reward_accuracy", "golden/heldout_policy", "replay_pairs")
# six iterations of the toy with a policy group of two ranks and an lr warm-up that a resume must continue
ARGS = ("run.iterations=6", "rollout.prompts_per_iteration=8", "data.heldout=16", "policy.world_size=2",
        "policy.warmup_steps=6")


def cli(*args, fault: str = "", fault_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "AFD_RAY_FAULT"))}
    if fault:
        env |= {faults.ENV: fault, faults.DIR_ENV: str(fault_dir)}
    return subprocess.run([sys.executable, str(JOB), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def toy(sft, out, name, *extra):
    return ("--config", "toy", f"model.policy={sft}", f"run.output_dir={out}", f"run.name={name}", *ARGS, *extra)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def events(run_dir: Path) -> list[dict]:
    f = run_dir / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def assert_same_numbers(expected: list[dict], got: list[dict]) -> None:
    assert [m["iteration"] for m in got] == [m["iteration"] for m in expected]  # each iteration exactly once
    for a, b in zip(expected, got):
        for k in REPRODUCED:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)


@pytest.fixture(scope="module")
def uninterrupted(toy_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    p = cli(*toy(toy_sft, out, "full"))
    assert p.returncode == 0, p.stderr[-3000:]
    return metrics(out / "full")


def test_stop_resume_driver_killed_in_a_commit_and_extend_through_the_command_line(toy_sft, tmp_path,
                                                                                   uninterrupted):
    run_dir = tmp_path / "part"
    p = cli(*toy(toy_sft, tmp_path, "part", "run.stop_after=2"))
    assert p.returncode == 0 and "continue with --resume" in p.stdout, p.stderr[-3000:]
    assert [m["iteration"] for m in metrics(run_dir)] == [1.0, 2.0] and not (run_dir / "report.md").exists()
    # resumed with the run directory alone; the driver is SIGKILLed inside its second checkpoint commit
    # (iteration 4: every file written, metrics line 4 too, the rename not yet done)
    p = cli("--resume", str(run_dir), fault="driver.commit@2=kill", fault_dir=tmp_path)
    assert p.returncode == -9, p.stderr[-3000:]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text()) == {"iteration": 3}
    assert (run_dir / "checkpoints" / ".iter_000004.partial" / "manifest.json").is_file()
    assert [m["iteration"] for m in metrics(run_dir)] == [1.0, 2.0, 3.0, 4.0]
    # the next resume continues from the last complete checkpoint (3), runs 4 again and finishes the schedule
    p = cli("--resume", str(run_dir))
    assert p.returncode == 0 and "continuing" in p.stdout and "done:" in p.stdout, p.stderr[-3000:]
    assert_same_numbers(uninterrupted, metrics(run_dir))
    assert (run_dir / "report.md").is_file()
    # --resume with an override extends the run; the change is validated and recorded
    p = cli("--resume", str(run_dir), "run.iterations=0")
    assert p.returncode == 2 and "run.iterations must be >= 1" in p.stderr
    p = cli("--resume", str(run_dir), "run.iterations=8")
    assert p.returncode == 0, p.stderr[-3000:]
    ms = metrics(run_dir)
    assert [m["iteration"] for m in ms] == [float(t) for t in range(1, 9)]
    assert_same_numbers(uninterrupted, ms[:6])
    change = [e for e in events(run_dir) if e["event"] == "config_change"]
    assert change[-1]["changes"] == ["run.iterations: 6 -> 8"]
    # a new run under the same name with another config is refused, not silently resumed
    p = cli(*toy(toy_sft, tmp_path, "part", "policy.lr=1e-3"))
    assert p.returncode == 2 and "already holds a run with another config" in p.stderr


def test_killed_rollout_engine_killed_learner_rank_and_hung_engine_are_recovered(toy_sft, tmp_path, uninterrupted):
    """One policy rank dies at the 3rd of its 4 mini-batch updates of iteration 1 (its peer is left in a
    collective), the rollout engine at its 2nd generate (iteration 2's training samples and held-out probe),
    an engine hangs in the sync check of iteration 3 (call_timeout_s=20). Each time the job recreates every
    group from the last checkpoint and goes on by itself."""
    fault = "policy.update@3=kill;rollout.generate@2=kill;rollout.prompt_logprobs@3=hang"
    p = cli(*toy(toy_sft, tmp_path, "faults", "run.max_restarts=3", "run.call_timeout_s=20"), fault=fault,
            fault_dir=tmp_path)
    assert p.returncode == 0 and "done:" in p.stdout, p.stderr[-3000:]
    run_dir = tmp_path / "faults"
    restarts = [e for e in events(run_dir) if e["event"] == "restart"]
    assert len(restarts) == 3, restarts
    assert any("rollout" in e["dead_roles"] for e in restarts) and any("policy" in e["dead_roles"] for e in restarts)
    assert any("CallTimeout" in e["reason"] and "rollout.prompt_logprobs" in e["reason"] for e in restarts)
    ms = metrics(run_dir)
    # every iteration is re-run from the last checkpoint (one per iteration) with the same seeds, data
    # cursor, replay and learner RNG states, so the numbers are the uninterrupted run's up to float noise
    assert_same_numbers(uninterrupted, ms)
    assert ms[-1]["run/restarts"] == 3.0


def test_nan_in_synced_weights_and_in_rewards_is_skipped_counted_then_stops_cleanly(toy_sft, tmp_path):
    """The weights an engine receives at the 2nd sync turn NaN once: the sync check fails on it, the sync
    is repeated and counted. From the 3rd scoring call (iteration 3: one per iteration, the held-out
    diagnostics' scores ride in it) the reward model outputs NaN: the policy
    step is skipped and counted, no checkpoint is written over the last good one, and the second skip in a
    row (run.max_nonfinite=2) stops the run with an error naming the role and the iteration."""
    fault = "rollout.receive_weights@2=nan;reward.score@3=nan+"
    p = cli(*toy(toy_sft, tmp_path, "nan", "run.max_nonfinite=2"), fault=fault, fault_dir=tmp_path)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "score: non-finite rewards of the samples at iteration 4, 2 steps in a row" in p.stderr
    run_dir = tmp_path / "nan"
    ms = metrics(run_dir)
    assert [m["iteration"] for m in ms] == [1.0, 2.0, 3.0]
    assert ms[1]["sync/nonfinite_skips"] == 1.0 and ms[1]["sync/sync_logprob_diff"] < 1e-2  # repeated, then good
    assert ms[2]["score/nonfinite_skips"] == 1.0 and "policy/loss" not in ms[2]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text()) == {"iteration": 2}
