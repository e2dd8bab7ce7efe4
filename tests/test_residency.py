"""Engine residency (afd_ray.workers.handles.RolloutPool) with the driver: colocated engines sleep after
sampling, and whatever samples next (a reward warm-up iteration, the final evaluation, a step whose sync was
skipped, a resumed run) finds them awake and current. The pool is the real one; the engines, the learner and
the sync under it are named fakes that refuse to sample asleep or stale."""

import torch
from test_driver import Done, FakeReference, FakeReward, FakeRollout, demos

from afd_ray.config import load_config
from afd_ray.driver import Collaborators, LoopState, evaluate_policy, irl_iteration
from afd_ray.replay import DataCursor
from afd_ray.types import SamplingSpec
from afd_ray.workers.handles import RolloutPool


class FakeLearner:
    """A policy handle: counts its updates (``step``) like PolicyGroup."""

    def __init__(self):
        self.step = 0

    def update(self, batch):
        self.step += 1
        return {"loss": 0.1, "grad_norm": 1.0}

    def logprobs(self, seqs):
        return [[-1.0] * len(r) for r in seqs.responses]

    submit_logprobs = logprobs


class FakeEngines:
    """Stands in for the rollout ActorGroup: two engines that refuse to sample asleep or with weights older
    than the learner's step; ``log`` records every call."""

    world_size, timeout_s = 2, None

    def __init__(self, learner):
        self.learner, self.asleep, self.version, self.log = learner, False, 0, []

    def call(self, method):
        self.log.append(method)
        self.asleep = method == "sleep"

    def submit_each(self, method, args):
        assert method == "generate"
        assert not self.asleep, "asked to sample while asleep"
        assert self.version == self.learner.step, "asked to sample with stale weights"
        self.log.append("generate")
        return Done([[FakeRollout().generate(*r) if r else None for r in a[0]] for a in args if a is not None])


def colocated():
    learner = FakeLearner()
    engines = FakeEngines(learner)
    pool = RolloutPool(engines, sleep_between=True)

    def push():  # the weight sync's fake: the engines get the learner's weights; the pool records it
        engines.log.append("sync")
        engines.version = pool.version = learner.step
        return {"sync_seconds": 0.0}

    pool.learner, pool.push = learner, push
    c = Collaborators(rollout=pool, policy=learner, reward=FakeReward(), reference=FakeReference(), sync=push)
    return c, engines


def test_warm_up_iterations_and_the_final_evaluation_sample_awake_and_current():
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "reward.warmup_iterations=2", "run.iterations=4", "data.heldout=2"])
    c, engines = colocated()
    d = demos()
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    for t in range(1, 5):
        irl_iteration(t, cfg, d, d[:2], c, state)
    evaluate_policy(cfg, d[:2], c)
    # warm-up iterations 1-2 never sync: the next generate wakes the engines itself; the held-out probe
    # is sampled in the same engine call as the training samples
    assert engines.log[:5] == ["generate", "sleep", "wake_up", "generate", "sleep"]
    # iterations 3 and 4 step (4 mini-batches each) and sync once each
    assert engines.log.count("sync") == 2 and c.policy.step == 8
    assert engines.log[-2:] == ["wake_up", "generate"]  # the final evaluation, after the last sleep


def test_an_update_without_its_sync_is_pushed_before_the_next_sample():
    c, engines = colocated()
    c.policy.update(None)  # a step whose sync did not happen (its iteration stopped after the update)
    c.rollout.generate([[1, 2]], SamplingSpec(n=2))
    assert engines.log == ["sync", "generate"] and c.rollout.version == 1


def test_a_resumed_run_starts_current_and_samples_without_a_sync():
    c, engines = colocated()  # new actors from a checkpoint: learner and engines load the same model
    out = c.rollout.generate([[1, 2], [3, 4]], SamplingSpec(n=1))
    assert engines.log == ["generate"] and out.response_ids == [[1, 0], [3, 0]]
    assert torch.equal(torch.tensor(out.prompt_ids), torch.tensor([[1, 2], [3, 4]]))


class FakeLearnerStates:
    """A colocated learner group's optimizer states: on the GPU or offloaded; refuses to share the GPU
    with awake engines."""

    def __init__(self, engines):
        self.engines, self.on_gpu = engines, True

    def offload_states(self):
        self.engines.log.append("offload")
        self.on_gpu = False

    def reload_states(self):
        assert self.engines.asleep, "learner states reloaded while the engines are awake"
        self.engines.log.append("reload")
        self.on_gpu = True


def test_colocated_learners_and_engines_never_hold_the_gpu_together():
    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "run.iterations=2", "data.heldout=2"])
    c, engines = colocated()
    states = [FakeLearnerStates(engines), FakeLearnerStates(engines)]  # policy and reward groups
    c.rollout.learners = states
    d = demos()
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    for t in range(1, 3):
        irl_iteration(t, cfg, d, d[:2], c, state)
    log = engines.log
    # every wake-up follows the offload of each learner group; every sleep is followed by their reload
    for i, event in enumerate(log):
        if event == "wake_up":
            assert log[i - 2:i] == ["offload", "offload"]
        if event == "sleep":
            assert log[i + 1:i + 3] == ["reload", "reload"]
    assert log.count("wake_up") >= 1 and all(s.on_gpu for s in states)  # the loop ends with the learners back


def test_engines_that_drop_their_weights_in_sleep_are_synced_before_they_sample_again():
    c, engines = colocated()
    c.rollout.sleep_level = 2
    c.rollout.generate([[1, 2]], SamplingSpec(n=1))  # awake and current from the start: no sync
    c.rollout.sleep()
    assert c.rollout.stale  # no learner step happened, but the weights are gone
    c.rollout.generate([[1, 2]], SamplingSpec(n=1))
    assert engines.log == ["generate", "sleep", "wake_up", "sync", "generate"]


def test_best_of_n_after_the_loop_wakes_the_engines_and_samples_current():
    """Inverse-RLignment's RL stage then Best-of-N: the loop leaves the engines asleep after its last
    update; Best-of-N's chunks go through the same pool, which wakes them and pushes the last update."""
    from afd_ray.methods.irlignment import best_of_n

    cfg = load_config("toy", ["model.policy=x", "rollout.prompts_per_iteration=3", "rollout.n=2",
                              "run.iterations=1", "data.heldout=0"])
    c, engines = colocated()
    d = demos()
    irl_iteration(1, cfg, d, [], c, LoopState(cursor=DataCursor(len(d), seed=0)))
    c.policy.update(None)  # a last update whose sync never ran (e.g. the stage stopped right after it)
    assert engines.asleep and c.rollout.stale
    rows = best_of_n(c.rollout.generate, lambda seqs: torch.tensor([float(r[-1]) for r in seqs.responses]),
                     [x.prompt_ids for x in d[:4]], [1, 2, 4], SamplingSpec(n=1, seed=3), prompt_batch=2,
                     sample_chunk=2)
    first = engines.log.index("generate", engines.log.index("sleep"))
    assert engines.log[first - 2:first] == ["wake_up", "sync"] and "sleep" not in engines.log[first:]
    assert engines.log[first:].count("generate") == 2 * 3  # 2 prompt batches x chunks of 1, 1 and 2 samples
    assert sorted(rows) == [1, 2, 4] and not c.rollout.stale
