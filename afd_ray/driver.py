"""The bi-level IRL loop (DESIGN.md Sec. 1; seeds/004 Eq. 21a-21b). Collaborators are injected: the real
ones are Ray actor handles (``afd_ray.workers.handles``), driver-logic tests pass named fakes.

    for t in iterations:
        y' ~ pi_t(.|x) for x in the next prompts                      rollout (vLLM)
        phi_{t+1} = argmin -log s(r(x, y*) - r(x, y'))  over replay     reward step (Eq. 21a)
        r = r_phi_{t+1}(x, y'),  log pi_ref(y'|x)  (concurrently)       forward
        theta_{t+1}: max E[r] - beta KL(pi || pi_ref)                   policy step (Eq. 21b)
        sync theta_{t+1} -> vLLM, check;  log;  checkpoint
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from afd_ray.algo.credit import policy_batch, sequences
from afd_ray.config import Config
from afd_ray.data.tokenize import Encoded, EncodedPreference
from afd_ray.eval.golden import win_rate
from afd_ray.replay import DataCursor, PairReplay
from afd_ray.runtime.guard import NonFiniteGuard, finite, reward_saturation
from afd_ray.types import PairBatch, Samples, SamplingSpec, SequenceBatch
from afd_ray.workers.group import run_calls
from afd_ray.workers.handles import WeightSyncError


@dataclass
class Collaborators:
    rollout: Any  # generate(prompt_ids, SamplingSpec) -> Samples; sleep() (woken by sync)
    policy: Any  # update(PolicyBatch) -> stats; logprobs(SequenceBatch) -> per-token lists
    reward: Any  # update(PairBatch, loss, margin) -> stats; score(SequenceBatch) -> (B,) tensor; None: rules only
    reference: Any  # logprobs(SequenceBatch) -> per-token lists
    sync: Callable[[], dict[str, float]]  # push theta to the engines and check them
    golden: Callable[[list[list[int]], list[list[int]]], list[float]] | None = None
    critic: Any = None  # values(SequenceBatch) -> per-token lists; update(seqs, returns, old_values, clip, coef)
    overlap: bool = True  # independent calls on different roles run at once (Plan.overlaps)
    rules: Any = None  # afd_ray.rewards.RuleRewards: (prompts, responses) -> ((B,) rewards, metrics), added

    @classmethod
    def of(cls, system, golden=None, rules=None, reward=None) -> Collaborators:
        """The real collaborators: the handles of an ``afd_ray.runtime.system.System`` (``reward``: a scorer
        outside it, e.g. a served reward model, instead of the reward group)."""
        h = system.handles
        return cls(rollout=h.get("rollout"), policy=h.get("policy"), reward=reward or h.get("reward"),
                   reference=h.get("reference"), sync=system.sync.sync if system.sync else None, golden=golden,
                   critic=h.get("critic"), overlap=system.overlaps, rules=rules)


@dataclass
class PreferenceData:
    """aihf: preference pairs (EncodedPreference) for the reward step, and held-out ones for accuracy."""

    train: list
    heldout: list = field(default_factory=list)


@dataclass
class Ahead:
    """run.async_rollout: the next iteration's prompts (demo indices) and their samples and probe, sampled
    while this iteration trained: ``work`` is a ``Pending`` until waited for (``result``), then the pair."""

    idx: list[int]
    work: Any
    steps: int = 0  # the learner's policy steps when it was submitted (the engines had those weights)

    def result(self) -> tuple[Samples, Samples | None]:
        if not isinstance(self.work, tuple):
            self.work = split_probe(self.work.result())
        return self.work


@dataclass
class LoopState:
    """Everything besides the models that a resumed run needs: the last finished iteration, the data
    cursor and the pair replay; under run.async_rollout the samples already drawn for the next iteration
    (``ahead``) and whether the engines still hold the weights from before the last policy step."""

    cursor: DataCursor
    replay: PairReplay = field(default_factory=PairReplay)
    iteration: int = 0
    pref_cursor: DataCursor | None = None  # aihf: walks the preference pairs
    ahead: Ahead | None = None
    engines_behind: bool = False  # a policy step since the last sync (async: the sync comes next iteration)
    policy_steps: int = 0  # policy steps taken (async: how far the learner is ahead of what sampled)


class Phases:
    """Wall-clock seconds per phase of one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = self.seconds.get(f"time/{name}", 0.0) + time.perf_counter() - t0


def sampling(cfg: Config, t: int, n: int | None = None) -> SamplingSpec:
    return SamplingSpec(n=cfg.rollout.n if n is None else n, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_new_tokens,
                        seed=cfg.run.seed * 1_000_003 + t)


def probe_requests(cfg: Config, t: int, prompt_ids: list[list[int]],
                   heldout: list[Encoded]) -> list[tuple[list[list[int]], SamplingSpec]]:
    """Iteration t's n samples per prompt and, with held-out demonstrations, one sample per held-out
    prompt (the probe), as requests of one engine call so the probe rides in the same batches."""
    requests = [(prompt_ids, sampling(cfg, t))]
    if heldout:
        requests.append(([d.prompt_ids for d in heldout], sampling(cfg, -t, n=1)))
    return requests


def split_probe(answers: list[Samples]) -> tuple[Samples, Samples | None]:
    samples, *probe = answers
    return samples, (probe[0] if probe else None)


def sample_with_probe(rollout, cfg: Config, t: int, prompt_ids: list[list[int]],
                      heldout: list[Encoded]) -> tuple[Samples, Samples | None]:
    """``probe_requests`` sampled now: (samples, probe), the probe None without held-out demonstrations."""
    return split_probe(rollout.generate_many(probe_requests(cfg, t, prompt_ids, heldout)))


def irl_iteration(t: int, cfg: Config, demos: list[Encoded], heldout: list[Encoded], c: Collaborators,
                  state: LoopState, learn_reward: bool = True, prefs: PreferenceData | None = None,
                  guard: NonFiniteGuard | None = None) -> dict[str, float]:
    """One alternation; returns its metrics. Mutates ``state`` (cursor, replay, iteration).
    ``learn_reward=False`` keeps r_phi fixed (RL on a learned reward, e.g. after Inverse-RLignment);
    ``prefs`` (aihf) mixes preference pairs into the reward step (seeds/004 Eq. 24a). ``guard`` skips and
    counts the steps whose rewards, losses, gradients or sync log-probs are not finite."""
    guard = guard or NonFiniteGuard(cfg.run.max_nonfinite)
    phase, m = Phases(), {"iteration": float(t)}
    with phase("rollout"):  # under async rollout: the wait for what was sampled during the last iteration
        if state.ahead is not None:
            idx, (samples, probe) = state.ahead.idx, state.ahead.result()
            m["rollout/policy_lag"] = float(state.policy_steps - state.ahead.steps)  # steps sampler -> learner
            state.ahead = None
        else:
            idx = state.cursor.take(cfg.rollout.prompts_per_iteration)
            samples, probe = sample_with_probe(c.rollout, cfg, t, [demos[i].prompt_ids for i in idx], heldout)
            m["rollout/policy_lag"] = 0.0
            c.rollout.sleep()  # colocated engines free the GPU for the learners (a no-op otherwise)
    if cfg.run.async_rollout:
        sample_ahead(t, cfg, demos, heldout, c, state, guard, phase, m)
    seqs = sequences(samples)
    if learn_reward:
        m.update(reward_step(t, cfg, demos, idx, samples, c, state, phase, prefs.train if prefs else None))
        guard.ok("reward", t, m.get("reward/nonfinite", 0.0) == 0.0, "reward-model loss or gradients")
    held = heldout_batch(heldout, probe.response_ids) if probe is not None else None
    held_scores = None
    if t > cfg.reward.warmup_iterations or not learn_reward:
        step, held_scores = policy_step(cfg, samples, seqs, c, phase, guard, t, state, also_score=held)
        m.update(step)
    with phase("diagnostics"):
        m["rollout/response_length"] = sum(map(len, samples.response_ids)) / len(samples.response_ids)
        if c.golden is not None:
            m["golden/train_samples"] = mean(c.golden(seqs.prompts, seqs.responses))
        if probe is not None:
            m.update(heldout_diagnostics(heldout, probe.response_ids, c, held_scores))
            if learn_reward:
                reward_saturation(m, t)
        if prefs is not None and prefs.heldout:
            m.update({f"heldout/{k}": v for k, v in preference_accuracy(c.reward, prefs.heldout).items()})
    m.update(phase.seconds)
    m.update(guard.metrics())
    m["time/iteration"] = sum(phase.seconds.values())
    m.update(throughput(cfg, samples, seqs, probe, m))
    state.iteration = t
    return m


def sample_ahead(t: int, cfg: Config, demos: list[Encoded], heldout: list[Encoded], c: Collaborators,
                 state: LoopState, guard: NonFiniteGuard, phase: Phases, m: dict[str, float]) -> None:
    """run.async_rollout: bring the engines up to the learner (the sync deferred from the last policy
    step) and submit iteration t+1's sampling, which runs while this iteration trains. Nothing after the
    run's last iteration (a run stopped early by run.stop_after keeps it: the checkpoint holds it)."""
    if state.engines_behind:
        with phase("sync"):
            m.update({f"sync/{k}": v for k, v in synced(c, guard, t).items()})
        state.engines_behind = False
    if t < cfg.run.iterations:
        idx = state.cursor.take(cfg.rollout.prompts_per_iteration)
        requests = probe_requests(cfg, t + 1, [demos[i].prompt_ids for i in idx], heldout)
        state.ahead = Ahead(idx, c.rollout.submit_many(requests), state.policy_steps)


def throughput(cfg: Config, samples, seqs: SequenceBatch, probe, m: dict[str, float]) -> dict[str, float]:
    """Tokens (or pairs) per second of each role in this iteration, from the phase times: rollout =
    generated tokens (training samples and the held-out probe); policy / critic = prompt + response tokens
    of the iteration's sequences (x epochs) over the update phase (for online_dpo, which trains on the
    selected pairs only, a rate of the phase, not of the update); reward =
    pairs processed; iteration = generated tokens over the whole iteration."""
    generated = sum(map(len, samples.response_ids)) + (sum(map(len, probe.response_ids)) if probe else 0)
    learned = sum(len(p) + len(r) for p, r in zip(seqs.prompts, seqs.responses)) * cfg.policy.epochs
    out = {"throughput/rollout_tokens_per_s": generated / max(m.get("time/rollout", 0.0), 1e-9),
           "throughput/tokens_per_s": generated / max(m["time/iteration"], 1e-9)}
    if "time/policy" in m:
        out["throughput/policy_tokens_per_s"] = learned / max(m["time/policy"], 1e-9)
    if "time/critic" in m:
        out["throughput/critic_tokens_per_s"] = learned / max(m["time/critic"], 1e-9)
    if "time/reward" in m and "reward/pairs" in m:
        pairs = m["reward/pairs"] + m.get("preference_pairs", 0.0)
        out["throughput/reward_pairs_per_s"] = pairs / max(m["time/reward"], 1e-9)
    return out


def reward_step(t: int, cfg: Config, demos: list[Encoded], idx: list[int], samples, c: Collaborators,
                state: LoopState, phase: Phases, prefs: list | None = None) -> dict[str, float]:
    """Eq. 21a over this iteration's demo-vs-sample pairs and the replay window. With ``prefs`` (AIHF,
    Eq. 24a) every batch of demo pairs is joined by as many preference pairs, weighted so the loss is
    gamma * mean(demo-pair loss) + alpha * mean(preference-pair loss)."""
    m: dict[str, float] = {}
    n = samples.n
    with phase("reward"):
        state.replay.add(t, [idx[k // n] for k in range(len(samples.response_ids))], samples.response_ids)
        window = state.replay.window(t, cfg.reward.replay_window)
        m["replay_pairs"] = float(len(window))
        stats, used, skipped, pairs_seen = {}, 0, 0.0, 0
        for order in reward_batches(window, t, cfg):
            for s in range(0, len(order), cfg.reward.batch_size):
                chunk = [window[i] for i in order[s:s + cfg.reward.batch_size]]
                pairs_seen += len(chunk)
                pairs = PairReplay.batch(chunk, demos)
                if prefs:
                    pairs = mix_preferences(pairs, [prefs[i] for i in state.pref_cursor.take(len(chunk))],
                                            cfg.reward.demo_weight, cfg.reward.preference_weight)
                    used += len(chunk)
                stats = c.reward.update(pairs, cfg.reward.loss, cfg.reward.margin)
                skipped += stats.get("nonfinite", 0.0)
        m.update({f"reward/{k}": v for k, v in stats.items()})
        m["reward/nonfinite"] = skipped  # updates of this step that DeepSpeed skipped for NaN/inf gradients
        m["reward/pairs"] = float(pairs_seen)
        if prefs:
            m["preference_pairs"] = float(used)
    return m


def reward_batches(window: list, t: int, cfg: Config) -> list[list[int]]:
    """The reward step's passes as index orders into ``window``, each walked in batches of
    ``reward.batch_size``: ``reward.epochs`` seeded shuffles of the whole window, or with
    ``reward.updates_per_iteration = k`` one order of at most k batches: this iteration's pairs, then earlier
    ones at random, so the step costs the same in iteration 200 as in iteration 2 (k = -1: four times
    the batches of this iteration's pairs). Pairs are shuffled one by
    one: keeping a demonstration's n pairs together would forward it once per micro-batch, but fewer
    distinct demonstrations per batch slowed the reward model's learning on the toy (docs/LOG.md)."""
    g = torch.Generator().manual_seed(cfg.run.seed + t)
    k = cfg.reward.updates_per_iteration
    if not k:
        return [torch.randperm(len(window), generator=g).tolist() for _ in range(cfg.reward.epochs)]
    new = [i for i, p in enumerate(window) if p[0] == t]
    if k < 0:
        k = 4 * -(-len(new) // cfg.reward.batch_size)
    old = [i for i, p in enumerate(window) if p[0] != t]
    take = [new[j] for j in torch.randperm(len(new), generator=g).tolist()]
    take += [old[j] for j in torch.randperm(len(old), generator=g).tolist()]
    take = take[:k * cfg.reward.batch_size]
    return [[take[j] for j in torch.randperm(len(take), generator=g).tolist()]]


def mix_preferences(demo_pairs: PairBatch, prefs: list, gamma: float, alpha: float) -> PairBatch:
    """Demo-vs-sample pairs followed by preference pairs (x, y_w, y_l), with per-pair weights
    gamma * n / n_demo and alpha * n / n_pref (the learner divides the weighted sum by n)."""
    nd, npf = len(demo_pairs), len(prefs)
    n = nd + npf
    chosen = SequenceBatch(demo_pairs.chosen.prompts + [p.prompt_ids for p in prefs],
                           demo_pairs.chosen.responses + [p.chosen_ids for p in prefs])
    rejected = SequenceBatch(demo_pairs.rejected.prompts + [p.prompt_ids for p in prefs],
                             demo_pairs.rejected.responses + [p.rejected_ids for p in prefs])
    weight = torch.cat([torch.full((nd,), gamma * n / max(nd, 1)), torch.full((npf,), alpha * n / max(npf, 1))])
    return PairBatch(chosen, rejected, weight)


def policy_step(cfg: Config, samples, seqs: SequenceBatch, c: Collaborators, phase: Phases,
                guard: NonFiniteGuard, t: int, state: LoopState | None = None,
                also_score: SequenceBatch | None = None) -> tuple[dict[str, float], torch.Tensor | None]:
    """Score with r_phi_{t+1}, get log pi_ref (with the old log-probs and values where the algorithm
    needs them: one phase, ``forward``, its calls at once where the roles do not share cores), take the
    KL-regularised policy step (Eq. 21b), sync (under run.async_rollout the next iteration syncs, after
    the samples drawn meanwhile: ``state.engines_behind``). A non-finite reward or reference log-prob skips
    the step (nothing to sync: the engines stay current). Returns the metrics and the rewards of
    ``also_score`` (the held-out diagnostics' sequences, scored in the same call as the samples)."""
    m: dict[str, float] = {}
    steps = cfg.policy.epochs * cfg.policy.mini_batches
    own_logp = cfg.policy.algo == "ppo" or steps > 1 or cfg.run.async_rollout  # pi_old, the learner's
    scored_seqs = seqs if also_score is None else SequenceBatch(seqs.prompts + also_score.prompts,
                                                                seqs.responses + also_score.responses)
    with phase("forward"):  # independent passes over the samples, each on its own actors: at once (GPUs)
        reward, ref_logp, old, values = run_calls([
            partial(c.reward.submit_score, scored_seqs) if c.reward is not None else None,
            partial(c.reference.submit_logprobs, seqs),
            partial(c.policy.submit_logprobs, seqs) if own_logp else None,
            partial(c.critic.submit_values, seqs) if cfg.critic.enabled else None], together=c.overlap)
        if reward is None:  # rule rewards alone (rlhf without a reward model)
            reward, extra = torch.zeros(len(seqs)), None
        else:
            reward, extra = reward[:len(seqs)], (reward[len(seqs):] if also_score is not None else None)
            m["reward/model_score"] = float(reward.mean()) if len(seqs) else 0.0
        if c.rules is not None:
            rules, rule_metrics = c.rules(seqs.prompts, seqs.responses)
            reward = reward + rules
            m.update(rule_metrics)
    scored = guard.ok("score", t, finite(reward.tolist()), "rewards of the samples")
    referenced = guard.ok("reference", t, finite(x for row in ref_logp for x in row), "reference log-probs")
    if not (scored and referenced):
        return m, extra
    with phase("policy"):  # Eq. 21b
        batch, credit = policy_batch(cfg.policy.algo, samples, reward, ref_logp, beta=cfg.policy.beta,
                                     kl_estimator=cfg.policy.kl_estimator, kl_in_reward=cfg.policy.kl_in_reward(),
                                     clip_eps=cfg.policy.clip_eps, dual_clip=cfg.policy.dual_clip,
                                     dpo_beta=cfg.policy.dpo_beta, dpo_min_gap=cfg.policy.dpo_min_gap,
                                     chosen_nll_weight=cfg.policy.chosen_nll_weight, old_logp=old, values=values,
                                     gamma=cfg.critic.gamma, lam=cfg.critic.lam,
                                     importance_cap=cfg.policy.importance_cap)
        stats, skipped = {}, 0.0  # stats stay empty when there is nothing to learn from (online_dpo: all tied)
        for _ in range(cfg.policy.epochs):
            for part in batch.split(cfg.policy.mini_batches):
                stats = c.policy.update(part)
                skipped += stats.get("nonfinite", 0.0)
        m.update({f"policy/{k}": v for k, v in stats.items()})
        m["policy/nonfinite"] = skipped
        m.update({f"rollout/{k}": v for k, v in credit.items()})
    if not guard.ok("policy", t, skipped == 0.0, "policy loss or gradients"):
        return m, extra  # DeepSpeed skipped the update (a skip in an earlier mini-batch leaves the later ones applied)
    if values is not None:
        with phase("critic"):  # the value model regresses onto the GAE returns, clipped around V_old
            stats = {}
            for _ in range(cfg.policy.epochs):
                for lo, hi in _parts(len(seqs), cfg.policy.mini_batches):
                    stats = c.critic.update(SequenceBatch(seqs.prompts[lo:hi], seqs.responses[lo:hi]),
                                            batch.returns[lo:hi], values[lo:hi], cfg.critic.value_clip,
                                            cfg.critic.vf_coef)
            m.update({f"critic/{k}": v for k, v in stats.items()})
    if state is not None:
        state.policy_steps += 1
        if cfg.run.async_rollout:
            state.engines_behind = True
            return m, extra
    with phase("sync"):
        m.update({f"sync/{k}": v for k, v in synced(c, guard, t).items()})
    return m, extra


def synced(c: Collaborators, guard: NonFiniteGuard, t: int) -> dict[str, float]:
    """Sync and check; non-finite log-probs on the engine side (weights damaged in transit) are counted and
    the sync is tried again, up to ``run.max_nonfinite`` in a row. A finite disagreement is an error at once."""
    while True:
        try:
            out = c.sync()
            guard.ok("sync", t, True)
            return out
        except WeightSyncError as e:
            if e.role != "rollout":  # a finite disagreement, or the learner's own weights: no retry can help
                raise
            guard.ok("sync", t, False, f"weight-sync log-probs ({e})")


def _parts(n: int, parts: int) -> list[tuple[int, int]]:
    """The contiguous row ranges of ``PolicyBatch.split`` (pg objective)."""
    return [(k * n // parts, (k + 1) * n // parts) for k in range(parts) if (k + 1) * n // parts > k * n // parts]


def heldout_batch(heldout: list[Encoded], responses: list[list[int]]) -> SequenceBatch:
    """The held-out demonstrations, then the policy's responses to the same prompts."""
    prompts = [d.prompt_ids for d in heldout]
    return SequenceBatch(prompts + prompts, [d.response_ids for d in heldout] + responses)


def heldout_diagnostics(heldout: list[Encoded], responses: list[list[int]], c: Collaborators,
                        scores: torch.Tensor | None = None, golden: list[float] | None = None) -> dict[str, float]:
    """Demo-vs-policy discrimination on held-out prompts: how often r(x, y*) > r(x, y'), the mean gap,
    and the golden reward of the policy's held-out samples (when a golden reward is configured).
    ``scores``: the rewards of ``heldout_batch`` when already made (in the policy step's forward phase);
    ``golden``: the golden reward of ``responses`` when already scored."""
    prompts = [d.prompt_ids for d in heldout]
    out = {}
    if c.reward is not None:
        r = scores if scores is not None else c.reward.score(heldout_batch(heldout, responses))
        r_demo, r_pol = r[: len(heldout)], r[len(heldout):]
        out = {"heldout/reward_accuracy": float((r_demo > r_pol).float().mean()),
               "heldout/reward_gap": float((r_demo - r_pol).mean())}
    if c.golden is not None:
        policy = golden if golden is not None else c.golden(prompts, responses)
        demos = c.golden(prompts, [d.response_ids for d in heldout])
        out["golden/heldout_policy"], out["golden/heldout_demos"] = mean(policy), mean(demos)
        # seeds/002's win rate against the demonstrations, per prompt, under the golden reward
        out["golden/heldout_win_rate_vs_demos"] = win_rate(policy, demos)[0]
    return out


def evaluate_policy(cfg: Config, heldout: list[Encoded], c: Collaborators, tag: str = "final") -> dict[str, float]:
    """Sample the current policy once per held-out prompt and report what ``heldout_diagnostics`` does."""
    responses = heldout_sample(cfg, heldout, c)
    return {f"{tag}/{k.split('/', 1)[1]}": v for k, v in heldout_diagnostics(heldout, responses, c).items()}


def heldout_sample(cfg: Config, heldout: list[Encoded], c: Collaborators) -> list[list[int]]:
    """One response per held-out prompt from the engines, always with the same seed: samples of two policies
    drawn so differ by the policy alone."""
    return c.rollout.generate([d.prompt_ids for d in heldout], sampling(cfg, -10**6, n=1)).response_ids


def preference_pairs(prefs: list[EncodedPreference], weight: float | None = None) -> PairBatch:
    prompts = [p.prompt_ids for p in prefs]
    return PairBatch(SequenceBatch(prompts, [p.chosen_ids for p in prefs]),
                     SequenceBatch(prompts, [p.rejected_ids for p in prefs]),
                     None if weight is None else torch.full((len(prefs),), float(weight)))


def preference_accuracy(rm, prefs: list[EncodedPreference]) -> dict[str, float]:
    """Reward accuracy on preference pairs: how often r(x, y_w) > r(x, y_l), and the mean gap."""
    pairs = preference_pairs(prefs)
    rw, rl = rm.score(pairs.chosen), rm.score(pairs.rejected)
    return {"preference_accuracy": float((rw > rl).float().mean()), "reward_gap": float((rw - rl).mean())}


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)
