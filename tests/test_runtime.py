"""The run directory without actors: config compared on reuse, checkpoint commits that verify every rank's
files, metrics and latest.json that survive a crash mid-write, the non-finite guard, fault sites."""

import json

import pytest

from afd_ray.config import ConfigError, load_config
from afd_ray.runtime.guard import NonFiniteError, NonFiniteGuard
from afd_ray.runtime.rundir import CheckpointError, RunDir


def cfg(tmp_path, *overrides):
    return load_config("toy", [f"run.output_dir={tmp_path}", "run.name=r", *overrides])


def test_a_different_config_under_an_existing_run_name_is_an_error_unless_resumed(tmp_path):
    rd = RunDir.open(cfg(tmp_path))
    assert RunDir.open(cfg(tmp_path)).path == rd.path  # same config: the same run, continued
    with pytest.raises(ConfigError, match=r"policy.lr: 0.002 -> 0.001.*--resume"):
        RunDir.open(cfg(tmp_path, "policy.lr=1e-3"))
    RunDir.open(cfg(tmp_path, "policy.lr=1e-3"), resume=True)
    (change,) = [e for e in rd.events() if e["event"] == "config_change"]
    assert change["changes"] == ["policy.lr: 0.002 -> 0.001"]
    assert rd.saved_config().policy.lr == 1e-3


def test_commit_verifies_every_ranks_files_and_publishes_latest_last(tmp_path):
    rd = RunDir.open(cfg(tmp_path))
    tmp = rd.begin(1)
    (tmp / "policy_state").mkdir()
    (tmp / "policy_state" / "zero_pp_rank_0.pt").write_bytes(b"x" * 10)
    written = {"policy": {0: {"policy_state/zero_pp_rank_0.pt": 10}, 1: {"policy_state/zero_pp_rank_1.pt": 7}}}
    with pytest.raises(CheckpointError, match="policy rank 1: policy_state/zero_pp_rank_1.pt is missing"):
        rd.commit(1, tmp, written, keep=1)
    (tmp / "policy_state" / "zero_pp_rank_1.pt").write_bytes(b"y" * 3)
    with pytest.raises(CheckpointError, match="has 3 bytes, the rank wrote 7"):
        rd.commit(1, tmp, written, keep=1)
    with pytest.raises(CheckpointError, match="policy rank 1 wrote no files"):
        rd.commit(1, tmp, {"policy": {0: written["policy"][0], 1: {}}}, keep=1)
    assert rd.latest() is None  # nothing was published by the failed commits
    (tmp / "policy_state" / "zero_pp_rank_1.pt").write_bytes(b"y" * 7)
    (tmp / "loop.pt").write_bytes(b"z")  # a file the driver wrote itself is in the manifest too
    final = rd.commit(1, tmp, written, keep=1)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"] == {"policy_state/zero_pp_rank_0.pt": 10, "policy_state/zero_pp_rank_1.pt": 7,
                                 "loop.pt": 1}
    assert rd.latest().iteration == 1 and rd.latest().path == final


def test_latest_survives_an_empty_or_damaged_latest_json(tmp_path):
    rd = RunDir.open(cfg(tmp_path))
    for t in (1, 2):
        tmp = rd.begin(t)
        (tmp / "loop.pt").write_bytes(b"z")
        rd.commit(t, tmp, {}, keep=2)
    (rd.ckpt / "latest.json").write_text("")  # the driver died while writing it
    assert rd.latest().iteration == 2
    (rd.ckpt / "latest.json").write_text('{"itera')
    assert rd.latest().iteration == 2
    (rd.ckpt / ".iter_000003.partial").mkdir()  # an unfinished checkpoint is never picked
    assert rd.latest().iteration == 2


def test_a_half_written_last_metrics_line_is_dropped_and_each_iteration_stays_once(tmp_path):
    rd = RunDir.open(cfg(tmp_path))
    for t in (1, 2):
        rd.append_metrics({"iteration": float(t), "x": t})
    rd.close()
    with open(rd.path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3.0, "x"')  # the driver died mid-line
    assert [m["iteration"] for m in rd.metrics()] == [1.0, 2.0]
    rd.truncate_metrics(1)
    assert [m["iteration"] for m in rd.metrics()] == [1.0]
    (rd.path / "metrics.jsonl").write_text('{"iteration": 1.0}\nnot json\n{"iteration": 2.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not JSON"):
        rd.metrics()


def test_the_guard_skips_counts_and_stops_after_max_in_a_row():
    guard = NonFiniteGuard(limit=2)
    assert guard.ok("reward", 1, False) is False and not guard.clean
    assert guard.ok("reward", 2, True) and guard.clean  # a finite step ends the streak
    assert guard.ok("policy", 3, False) is False
    with pytest.raises(NonFiniteError, match=r"policy: non-finite .* at iteration 4, 2 steps in a row"):
        guard.ok("policy", 4, False)
    assert guard.metrics() == {"policy/nonfinite_skips": 2.0, "reward/nonfinite_skips": 1.0}


def test_fault_sites_fire_once_per_run_or_from_the_kth_call(tmp_path, monkeypatch):
    import torch

    from afd_ray import faults

    monkeypatch.setenv(faults.ENV, "a.b@2=kill;c.d@2=nan+")
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(faults, "_calls", {})
    assert [faults.fires("a.b") for _ in range(3)] == [None, "kill", None]
    monkeypatch.setattr(faults, "_calls", {})  # a restarted process counts again, but the marker holds
    assert [faults.fires("a.b") for _ in range(3)] == [None, None, None]
    x = [faults.corrupt("c.d", torch.ones(2)) for _ in range(3)]
    assert [bool(torch.isnan(t).all()) for t in x] == [False, True, True]
    assert faults.fires("elsewhere") is None


class FakeSystem:
    """Stands in for the actors (the driver logic of ``drive`` is under test, not Ray)."""

    def __init__(self, dead=()):
        self.dead = list(dead)

    def dead_roles(self):
        return self.dead

    def shutdown(self):
        pass


class FakeRecipe:
    """A named fake recipe: ``faults[t]`` is a list of errors iteration t raises, one per attempt."""

    def __init__(self, faults, dead=()):
        self.faults, self.dead, self.system, self.starts, self.finished = faults, dead, None, [], False
        self.guard = NonFiniteGuard(3)

    def start(self, last):
        self.starts.append(last.iteration if last else 0)
        self.system = FakeSystem(self.dead)

    def iteration(self, t):
        if self.faults.get(t):
            raise self.faults[t].pop(0)
        return {"iteration": float(t), "value": 10.0 * t}

    def save(self, tmp):
        (tmp / "loop.pt").write_bytes(b"state")
        return {}

    def finish(self):
        self.finished = True


def drive_fake(tmp_path, recipe, *overrides):
    from afd_ray.runtime.loop import drive

    c = cfg(tmp_path, "run.iterations=5", *overrides)
    rd = RunDir.open(c)
    return rd, drive(rd, c, recipe, echo=lambda *_: None)


def test_drive_restarts_from_the_last_checkpoint_and_keeps_each_iteration_once(tmp_path):
    from ray.exceptions import ActorDiedError

    recipe = FakeRecipe({3: [ActorDiedError()], 5: [ActorDiedError()]})
    rd, complete = drive_fake(tmp_path, recipe, "run.checkpoint_every=2")
    assert complete and recipe.finished
    assert recipe.starts == [0, 2, 4]  # each restart resumes from the last committed checkpoint
    ms = rd.metrics()
    assert [m["iteration"] for m in ms] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [m["run/restarts"] for m in ms] == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert [(e["event"], e["after_iteration"]) for e in rd.events()] == [("restart", 2), ("restart", 4)]


def test_drive_stops_resumably_when_restarts_are_used_up(tmp_path):
    from ray.exceptions import ActorDiedError

    from afd_ray.runtime.loop import RunStopped

    recipe = FakeRecipe({2: [ActorDiedError() for _ in range(3)]})
    with pytest.raises(RunStopped, match=r"2 restarts used up \(run.max_restarts=2\).*--resume"):
        drive_fake(tmp_path, recipe, "run.max_restarts=2")
    rd = RunDir(tmp_path / "r")
    assert [e["event"] for e in rd.events()] == ["restart", "restart", "stopped"]
    assert [m["iteration"] for m in rd.metrics()] == [1.0] and rd.latest().iteration == 1


def test_drive_restarts_on_an_error_only_when_an_actor_is_dead(tmp_path):
    recipe = FakeRecipe({2: [ValueError("a bug")]})  # every actor alive: a bug, raised as it is
    with pytest.raises(ValueError, match="a bug"):
        drive_fake(tmp_path, recipe)
    assert RunDir(tmp_path / "r").events() == []
    recipe = FakeRecipe({2: [RuntimeError("gloo: connection reset by peer")]}, dead=["policy"])
    rd, complete = drive_fake(tmp_path / "b", recipe)  # the error of a rank whose peer died: a fault
    assert complete and [e["dead_roles"] for e in rd.events()] == [["policy"]]


def test_a_saturated_reward_model_is_flagged_and_warned_about(caplog):
    from afd_ray.runtime.guard import reward_saturation

    m = {"heldout/reward_accuracy": 0.75, "heldout/reward_gap": 0.4}
    reward_saturation(m, 3)
    assert m["heldout/reward_saturated"] == 0.0 and not caplog.records
    m = {"heldout/reward_accuracy": 1.0, "heldout/reward_gap": 2.5}
    reward_saturation(m, 7)
    assert m["heldout/reward_saturated"] == 1.0
    assert "iteration 7: held-out reward accuracy 1.00" in caplog.text and "reward.lr" in caplog.text
    reward_saturation(m := {}, 1)  # no held-out probe: nothing
    assert m == {}


def test_a_run_begun_from_model_policy_resumes_as_it_began(tiny_llama_dir, tmp_path, caplog):
    """model.sft empty trains pi_SFT before the first iteration; a run with checkpoints but no pi_SFT of its
    own (begun before that default) goes on from model.policy instead of switching models mid-run."""
    from afd_ray.methods import irl
    from afd_ray.runtime.rundir import Checkpoint

    cfg = load_config("toy", [f"model.policy={tiny_llama_dir}", "model.sft=", "data.limit=64", "data.heldout=8"])
    recipe = irl.IRL(cfg, RunDir(tmp_path / "run"), echo=lambda *_: None)
    assert recipe.sft == ""  # to be trained first
    last = Checkpoint(3, tmp_path / "run" / "checkpoints" / "iter_000003")
    paths = recipe.starting_paths(last)  # no sft/ in the run: nothing is trained
    assert recipe.sft is None and "continues from model.policy" in caplog.text
    assert paths["reference"] == str(tiny_llama_dir) and paths["policy"] == str(last.path / "policy")
