"""The driver's collaborators backed by real actors: rollout pool, policy / reward groups, reference, sync.

Each handle turns one driver call into one fan-out (data put in the object store once, ObjectRefs to
every rank) and one wait (``wait_all``: fails fast on a dead actor, raises ``CallTimeout`` past the
group's deadline). The forward passes come also as ``submit_*``: a ``Pending`` that the driver waits for
together with other groups' (``gather``), so they run at once. Driver-logic tests pass fakes with the same
methods instead (their ``submit_*`` return results, which ``gather`` passes through).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import ray
import torch

from afd_ray.types import PairBatch, PolicyBatch, Samples, SamplingSpec, SequenceBatch
from afd_ray.workers.group import ActorGroup, Pending, unshard, wait_all


class WeightSyncError(RuntimeError):
    """vLLM's log-probs disagree with the learner's after a weight sync: the engines hold stale or wrong
    weights, and sampling from them would silently train on the wrong policy. ``role`` is the side whose
    numbers are not finite ("policy" or "rollout"), or None when both are finite but disagree."""

    def __init__(self, message: str, role: str | None = None):
        super().__init__(message)
        self.role = role


class RolloutPool:
    """The engines behind one ``generate``, and their residency: awake or asleep (colocated,
    ``sleep_between=True``, they sleep after sampling so the learners have the GPU memory), weights current
    or stale (``version``, the learner step their weights came from, behind ``learner.step``). Whatever
    samples goes through ``generate``, which wakes the engines and, if their weights are stale, pushes the
    learner's first (``push``: the weight sync and its check), so no engine samples asleep or stale.

    Colocated, the two never hold the GPU at once: waking the engines first offloads the optimizer states
    of ``learners`` (the groups sharing their GPUs), putting them to sleep reloads them. At
    ``sleep_level=2`` the engines drop their weights while asleep (nothing to copy back, no host memory
    held), so their weights count as stale until the next sync."""

    def __init__(self, group: ActorGroup, sleep_between: bool = False, sleep_level: int = 1):
        self.group, self.sleep_between, self.sleep_level = group, sleep_between, sleep_level
        self.asleep = False
        self.version = 0  # learner steps behind the engines' weights (engines start from the learner's model)
        self.learner = None  # the PolicyGroup they serve, and the sync that brings them up to it: set together
        self.push = None
        self.learners: list = []  # learner groups on the same GPUs (colocated): offloaded while engines wake

    @property
    def stale(self) -> bool:
        return self.learner is not None and self.learner.step != self.version

    def ready(self) -> None:
        """Awake, with the learner's current weights."""
        self.wake_up()
        if self.stale and self.push is not None:
            self.push()

    def sleep(self) -> None:
        if self.sleep_between and not self.asleep:
            self.group.call("sleep")
            self.asleep = True
            if self.sleep_level >= 2:
                self.version = -1  # weights dropped: a sync must come before the next sample
            for g in self.learners:
                g.reload_states()

    def wake_up(self) -> None:
        if self.asleep:
            for g in self.learners:
                g.offload_states()
            self.group.call("wake_up")
            self.asleep = False

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Samples:
        return self.generate_many([(prompt_ids, spec)])[0]

    def generate_many(self, requests: list[tuple[list[list[int]], SamplingSpec]]) -> list[Samples]:
        """``submit_many`` and wait."""
        return self.submit_many(requests).result()

    def submit_many(self, requests: list[tuple[list[list[int]], SamplingSpec]]) -> Pending:
        """Sample several (prompts, spec) requests at once, to be waited for later (a ``Pending`` of one
        ``Samples`` per request): each request's prompts are split over the engines (contiguous chunks, so
        the order is kept) and every engine samples its share of all of them in one batch, then the parts
        are merged per request. ``ready`` first (an iteration that skipped its sync, e.g. a reward warm-up,
        left them asleep or stale). Engine i seeds its chunk of a request with ``spec.seed + 7919 * i``,
        whatever else it samples alongside."""
        self.ready()
        k = self.group.world_size
        per_engine: list[list] = [[] for _ in range(k)]
        for prompt_ids, spec in requests:
            for i in range(k):
                chunk = prompt_ids[i * len(prompt_ids) // k:(i + 1) * len(prompt_ids) // k]
                seed = None if spec.seed is None else spec.seed + 7919 * i
                per_engine[i].append((chunk, SamplingSpec(**{**asdict(spec), "seed": seed})) if chunk else None)

        def merge(parts: list) -> list[Samples]:
            out = []
            for j, (_, spec) in enumerate(requests):
                mine = [p[j] for p in parts if p is not None and p[j] is not None]
                out.append(Samples(prompt_ids=[x for s in mine for x in s.prompt_ids],
                                   response_ids=[r for s in mine for r in s.response_ids],
                                   logprobs=[lp for s in mine for lp in s.logprobs], n=spec.n))
            return out

        return self.group.submit_each("generate", [(reqs,) if any(reqs) else None for reqs in per_engine]).then(merge)


class _LearnerGroup:
    """What every DeepSpeed group shares: checkpoints."""

    def __init__(self, group: ActorGroup):
        self.group = group

    def save(self, ckpt_dir: str, hf_dir: str | None, tokenizer_path: str) -> dict[int, dict[str, int]]:
        """Every rank saves; returns, per rank, the files it wrote (relative to the checkpoint root, the
        parent of ``ckpt_dir``) and their sizes, for the runtime to verify before it commits."""
        return dict(enumerate(self.group.call("save", ckpt_dir, hf_dir, tokenizer_path)))

    def load(self, ckpt_dir: str) -> None:
        self.group.call("load", ckpt_dir)

    def offload_states(self) -> None:
        """Free this group's accelerator memory of optimizer states (colocated engines are waking)."""
        self.group.call("offload_states")

    def reload_states(self) -> None:
        self.group.call("reload_states")


class PolicyGroup(_LearnerGroup):
    def __init__(self, group: ActorGroup):
        super().__init__(group)
        self.step = 0  # updates sent since the actors started (the engines' weights are versioned by it)

    def update(self, batch: PolicyBatch) -> dict[str, float]:
        self.step += 1
        return self.group.call("update", ray.put(batch))[0]

    def submit_logprobs(self, seqs: SequenceBatch) -> Pending:
        return self.group.submit("logprobs", ray.put(seqs)).then(unshard)

    def logprobs(self, seqs: SequenceBatch) -> list[list[float]]:
        return self.submit_logprobs(seqs).result()


class RewardGroup(_LearnerGroup):
    def submit_score(self, seqs: SequenceBatch) -> Pending:
        return self.group.submit("score", ray.put(seqs)).then(
            lambda parts: torch.tensor(unshard(parts), dtype=torch.float32))

    def score(self, seqs: SequenceBatch) -> torch.Tensor:
        return self.submit_score(seqs).result()

    def update(self, pairs: PairBatch, loss: str = "pairwise", margin: float = 0.0) -> dict[str, float]:
        return self.group.call("update", ray.put(pairs), loss, margin)[0]


class CriticGroup(_LearnerGroup):
    def submit_values(self, seqs: SequenceBatch) -> Pending:
        return self.group.submit("values", ray.put(seqs)).then(unshard)

    def values(self, seqs: SequenceBatch) -> list[list[float]]:
        return self.submit_values(seqs).result()

    def update(self, seqs: SequenceBatch, returns: list[list[float]], old_values: list[list[float]],
               clip: float = 0.0, coef: float = 1.0) -> dict[str, float]:
        return self.group.call("update", ray.put(seqs), ray.put(returns), ray.put(old_values), clip, coef)[0]


class _Replicas:
    """Data-parallel replicas of a frozen model (one per slot it is given): a batch is split into
    contiguous chunks, one per replica, and the answers joined in order."""

    def __init__(self, group: ActorGroup):
        self.group = group

    def _submit(self, verb: str, seqs: SequenceBatch) -> Pending:
        k, n = self.group.world_size, len(seqs)
        bounds = [i * n // k for i in range(k + 1)]
        return self.group.submit_each(verb, [
            (SequenceBatch(seqs.prompts[a:b], seqs.responses[a:b]),) if b > a else None
            for a, b in zip(bounds, bounds[1:])]).then(lambda parts: [row for part in parts for row in part])


class Reference(_Replicas):
    """The frozen pi_ref's replicas."""

    def submit_logprobs(self, seqs: SequenceBatch) -> Pending:
        return self._submit("logprobs", seqs)

    def logprobs(self, seqs: SequenceBatch) -> list[list[float]]:
        return self.submit_logprobs(seqs).result()


class FixedReward(_Replicas):
    """A fixed reward model's replicas (``RewardServer``): scores, nothing to train or checkpoint."""

    def submit_score(self, seqs: SequenceBatch) -> Pending:
        return self._submit("score", seqs).then(lambda rows: torch.tensor(rows, dtype=torch.float32))

    def score(self, seqs: SequenceBatch) -> torch.Tensor:
        return self.submit_score(seqs).result()


class WeightSync:
    """Learner ranks -> every vLLM engine through vLLM's weight-transfer protocol (``backend``: gloo on
    CPU, ipc colocated, nccl separate; afd_ray/workers/transfer.py), then the check: the engines'
    log-probs of a fixed probe batch must match the learner's within ``tol`` (mean absolute difference per
    token), and each engine's weight version must be the learner step just sent, else WeightSyncError.
    ``engine_diffs`` holds each engine's difference from the last check."""

    def __init__(self, policy: ActorGroup, rollout: ActorGroup, probe: SequenceBatch, tol: float,
                 backend: str = "gloo", pool: RolloutPool | None = None):
        self.policy, self.rollout, self.probe, self.tol, self.pool = policy, rollout, probe, tol, pool
        self.backend = backend
        self.engine_diffs: list[float] = []
        timeout = policy.timeout_s
        tp = wait_all([rollout.actors[0].tensor_parallel_size.remote()], timeout, "rollout.tensor_parallel_size")[0]
        # the store (gloo, nccl) lives with learner rank 0; ipc needs none
        addr, port = wait_all([policy.actors[0].rendezvous.remote()], timeout, "policy.rendezvous")[0]
        policy.call("init_weight_transfer", backend, addr, port, 1 + tp * len(rollout.actors), rollout.actors, tp,
                    timeout)

    def sync(self) -> dict[str, float]:
        """Push the learner's weights to every engine and check them; the pool's engines are then current."""
        step = 0
        if self.pool is not None:
            self.pool.wake_up()
            step = self.pool.learner.step if self.pool.learner is not None else 0
        t0 = time.perf_counter()
        self.policy.call("send_weights", step)
        seconds = time.perf_counter() - t0
        diff = self.check()
        versions = self.rollout.call("weight_version")
        wrong = [i for i, v in enumerate(versions) if v != str(step)]
        if wrong:
            raise WeightSyncError(f"weight sync: rollout engines {wrong} report weight versions "
                                  f"{[versions[i] for i in wrong]} after the sync of learner step {step}")
        if self.pool is not None:
            self.pool.version = step
        return {"sync_seconds": seconds, "sync_logprob_diff": diff}

    def check(self) -> float:
        """Mean |log pi_vllm - log pi_learner| over the probe responses, worst engine; raises above tol,
        and on any non-finite log-prob (``nan > tol`` is false: NaN must fail explicitly)."""
        seqs = [p + r for p, r in zip(self.probe.prompts, self.probe.responses)]
        start = [len(p) for p in self.probe.prompts]
        learner = unshard(self.policy.call("logprobs", self.probe))
        if not all(math.isfinite(x) for row in learner for x in row):
            raise WeightSyncError("weight sync check: the policy learner's own log-probs of the probe batch are "
                                  "not finite: its weights are NaN/inf", role="policy")
        self.engine_diffs = []
        for i, engine in enumerate(self.rollout.call("prompt_logprobs", seqs, start)):
            if not all(math.isfinite(x) for row in engine for x in row):
                raise WeightSyncError(f"weight sync check: rollout engine {i} gives non-finite log-probs on the probe "
                                      "batch after the sync: the weights it received are corrupted", role="rollout")
            diffs = [abs(a - b) for e, lr in zip(engine, learner) for a, b in zip(e, lr)]
            diff = sum(diffs) / max(len(diffs), 1)
            self.engine_diffs.append(diff)
            if diff > self.tol:
                raise WeightSyncError(
                    f"weight sync check failed: rollout engine {i} disagrees with the policy learner by "
                    f"{diff:.4f} nats/token on the probe batch (tolerance run.sync_check_tol={self.tol}). "
                    "The engine holds stale or corrupted weights; stopping before it samples from them.")
        return max(self.engine_diffs, default=0.0)
