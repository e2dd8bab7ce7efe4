"""The baselines, on the same actors as the IRL loop (DESIGN.md Sec. 1):

- ``dpo`` / ``ipo``: offline preference optimisation against pi_ref = pi_SFT (seeds/004 Eq. 18; IPO);
- ``bt_rm``: a Bradley-Terry reward model from preferences (seeds/004 Eq. 13);
- ``spin``: self-play fine-tuning (seeds/004 Protocol 2): each iteration pairs demonstrations (winners)
  with the current policy's own samples (losers) and takes DPO steps against the previous iterate pi_t.

- ``aihf`` with ``run.aihf_form`` rpo / spac: seeds/004's special cases of AIHF with the policy as the
  reward (after Eq. 24), ``DirectAIHF``.

(``aihf`` itself, ``bilevel``, is the IRL loop with preference pairs in its reward step: ``afd_ray.driver``.)
Each writes ``metrics.jsonl`` per iteration, ``report.md`` and the trained model (``policy/`` or
``reward_model/``) into its run directory.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from afd_ray.config import Config
from afd_ray.data.build import build_data, build_preferences
from afd_ray.data.render import prompt_messages
from afd_ray.data.tokenize import Encoded
from afd_ray.driver import mean, preference_accuracy, preference_pairs, sample_with_probe, synced
from afd_ray.eval.golden import load_golden
from afd_ray.replay import DataCursor
from afd_ray.runtime.card import write_model_card
from afd_ray.runtime.guard import NonFiniteGuard
from afd_ray.runtime.loop import drive
from afd_ray.runtime.rundir import Checkpoint, RunDir
from afd_ray.runtime.system import System, ensure_ray
from afd_ray.types import PolicyBatch, SequenceBatch

# ---- data ----------------------------------------------------------------------------------------------

def pair_sequences(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> SequenceBatch:
    """Pairs interleaved as the DPO objective reads them: sequence 2i chosen, 2i + 1 rejected."""
    ps, rs = [], []
    for p, w, lo in zip(prompts, chosen, rejected):
        ps += [p, p]
        rs += [w, lo]
    return SequenceBatch(ps, rs)


def seq_logp(per_token: list[list[float]]) -> torch.Tensor:
    return torch.tensor([sum(lp) for lp in per_token], dtype=torch.float32)


def implicit_reward_accuracy(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> dict[str, float]:
    """How often beta*log(pi/pi_ref) ranks sequence 2i (chosen / demonstration) above 2i + 1, and the mean
    implicit-reward margin (seeds/004 Eq. 18: the reward DPO and SPIN define)."""
    r = beta * (logp - ref_logp)
    margin = r[0::2] - r[1::2]
    return {"implicit_reward_accuracy": float((margin > 0).float().mean()), "implicit_reward_margin": float(margin.mean())}


# ---- recipes ---------------------------------------------------------------------------------------------

class Baseline:
    """What the baselines share in the runtime: one learner (``policy`` or ``reward``) whose DeepSpeed state
    and HF model are checkpointed with ``loop.pt`` (the data cursor); the final model is copied to
    ``policy/`` or ``reward_model/`` and the report written once the last iteration is done."""

    learner = "policy"
    report_keys: list[str] = []

    def __init__(self, cfg: Config, rd: RunDir, echo=print):
        from afd_ray.models.loading import load_tokenizer, resolve_model_path

        self.cfg, self.rd, self.echo = cfg, rd, echo
        self.start_path = resolve_model_path(cfg.model.start())
        self.tokenizer = load_tokenizer(self.start_path)
        self.guard = NonFiniteGuard(cfg.run.max_nonfinite)
        self.system = None
        self.cursor = self.pref_cursor = None
        self.prefs: list = []
        self.metrics: dict[str, float] = {}

    # the recipe's own parts (and self.train, the items its data cursor walks)
    def paths(self, model: str) -> dict[str, str]: ...
    def step(self, t: int) -> dict[str, float]: ...

    def start(self, last: Checkpoint | None) -> None:
        self.cursor = DataCursor(len(self.train), seed=self.cfg.run.seed)
        if self.prefs:  # a second data stream (DirectAIHF's preference pairs)
            self.pref_cursor = DataCursor(len(self.prefs), seed=self.cfg.run.seed + 1)
        model, skips = self.initial_model(), {}
        if last is not None:
            loop = torch.load(last.path / "loop.pt", weights_only=True)  # our own file, still never code
            self.cursor, model = DataCursor(**loop["cursor"]), str(last.path / self.learner)
            if "pref_cursor" in loop:
                self.pref_cursor = DataCursor(**loop["pref_cursor"])
            skips = loop.get("nonfinite", {})
        self.guard = NonFiniteGuard(self.cfg.run.max_nonfinite, skips)  # counts as of the checkpoint
        ensure_ray()
        self.system = System(self.cfg, self.paths(model), self.tokenizer, self.probe(), roles=self.roles)
        if last is not None:
            self.system.handles[self.learner].load(str(last.path / f"{self.learner}_state"))
        self.begin()

    def initial_model(self) -> str:
        return self.start_path

    def probe(self) -> list:
        return []

    def begin(self) -> None:
        """After the actors are up: anything computed once per start."""

    def iteration(self, t: int) -> dict[str, float]:
        m = {"iteration": float(t)} | self.step(t)
        key = f"{self.learner}/nonfinite"
        self.guard.ok(self.learner, t, m.get(key, 0.0) == 0.0, f"{self.learner} loss or gradients")
        self.metrics = m | self.guard.metrics()
        return self.metrics

    def save(self, tmp: Path) -> dict[str, dict[int, dict[str, int]]]:
        written = self.system.handles[self.learner].save(str(tmp / f"{self.learner}_state"), str(tmp / self.learner),
                                                         self.start_path)
        write_model_card(tmp / self.learner, self.cfg, self.learner, self.start_path, self.metrics,
                         int(self.metrics.get("iteration", 0)), self.rd.path.name)
        loop = {"cursor": asdict(self.cursor), "nonfinite": self.guard.total}
        if self.pref_cursor is not None:
            loop["pref_cursor"] = asdict(self.pref_cursor)
        torch.save(loop, tmp / "loop.pt")
        return {self.learner: written}

    def finish(self) -> None:
        last = self.rd.latest()
        final = self.rd.path / ("policy" if self.learner == "policy" else "reward_model")
        tmp = final.with_name(f".{final.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last.path / self.learner, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_report(self.rd, self.cfg, self.report_keys)
        self.echo(f"done: {self.rd.path} ({self.rd.path / 'report.md'})")



class DPO(Baseline):
    """Offline DPO / IPO on data.preferences: run.iterations steps of policy.pairs_per_step pairs, against
    pi_ref = the starting policy (model.reference overrides); held-out implicit-reward accuracy each step."""

    roles = ("policy", "reference")
    report_keys = ["policy/loss", "policy/accuracy", "policy/margin", "heldout/implicit_reward_accuracy",
                   "heldout/implicit_reward_margin"]

    def __init__(self, cfg: Config, rd: RunDir, echo=print):
        super().__init__(cfg, rd, echo)
        self.train, heldout = build_preferences(cfg, self.tokenizer)
        self.held = pair_sequences(*zip(*[(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in heldout])) \
            if heldout else None

    def paths(self, model: str) -> dict[str, str]:
        from afd_ray.models.loading import resolve_model_path

        ref = resolve_model_path(self.cfg.model.reference) if self.cfg.model.reference else self.start_path
        return {"policy": model, "reference": ref}

    def begin(self) -> None:
        self.policy, self.reference = self.system.handles["policy"], self.system.handles["reference"]
        self.held_ref = seq_logp(self.reference.logprobs(self.held)) if self.held else None

    def step(self, t: int) -> dict[str, float]:
        chunk = [self.train[i] for i in self.cursor.take(self.cfg.policy.pairs_per_step)]
        seqs = pair_sequences([p.prompt_ids for p in chunk], [p.chosen_ids for p in chunk],
                              [p.rejected_ids for p in chunk])
        batch = PolicyBatch("dpo", seqs, ref_seq_logp=seq_logp(self.reference.logprobs(seqs)),
                            beta=self.cfg.policy.dpo_beta, loss_type=self.cfg.run.method)
        m = {f"policy/{k}": v for k, v in self.policy.update(batch).items()}
        if self.held:
            m |= {f"heldout/{k}": v for k, v in implicit_reward_accuracy(
                seq_logp(self.policy.logprobs(self.held)), self.held_ref, self.cfg.policy.dpo_beta).items()}
        return m


class BTRewardModel(Baseline):
    """A Bradley-Terry reward model (pairwise loss, seeds/004 Eq. 13) on data.preferences: run.iterations
    steps of reward.batch_size pairs; held-out pair accuracy each step."""

    learner = "reward"
    roles = ("reward",)
    report_keys = ["reward/loss", "reward/accuracy", "heldout/preference_accuracy", "heldout/reward_gap"]

    def __init__(self, cfg: Config, rd: RunDir, echo=print):
        super().__init__(cfg, rd, echo)
        self.train, self.heldout = build_preferences(cfg, self.tokenizer)

    def initial_model(self) -> str:
        from afd_ray.models.loading import resolve_model_path

        return resolve_model_path(self.cfg.model.reward) if self.cfg.model.reward else self.start_path

    def paths(self, model: str) -> dict[str, str]:
        return {"reward": model}

    def step(self, t: int) -> dict[str, float]:
        rm = self.system.handles["reward"]
        chunk = [self.train[i] for i in self.cursor.take(self.cfg.reward.batch_size)]
        m = {f"reward/{k}": v for k, v in rm.update(preference_pairs(chunk), "pairwise", self.cfg.reward.margin).items()}
        if self.heldout:
            m |= {f"heldout/{k}": v for k, v in preference_accuracy(rm, self.heldout).items()}
        return m


class SPIN(Baseline):
    """SPIN: per iteration, the next rollout.prompts_per_iteration demonstrations against rollout.n samples
    each from pi_t, DPO loss with pi_t as the reference (seeds/004 Protocol 2), then sync pi_{t+1} to the
    engines. Held-out: beta*log(pi_{t+1}/pi_t) of the demonstration vs a pi_t sample."""

    roles = ("policy", "rollout")
    report_keys = ["policy/loss", "policy/accuracy", "heldout/implicit_reward_accuracy",
                   "heldout/implicit_reward_margin", "golden/heldout_policy"]

    def __init__(self, cfg: Config, rd: RunDir, echo=print):
        super().__init__(cfg, rd, echo)
        self.train, self.heldout = build_data(cfg, self.tokenizer)
        self.golden = load_golden(cfg.run.golden_reward, self.tokenizer, cfg.run.golden_format,
                                  prompt_messages(self.train, self.heldout))

    def probe(self) -> list:
        return self.heldout[:4]

    def paths(self, model: str) -> dict[str, str]:
        return {"policy": model, "rollout": model}

    def begin(self) -> None:
        self.system.sync.check()

    def step(self, t: int) -> dict[str, float]:
        cfg, policy, rollout = self.cfg, self.system.handles["policy"], self.system.handles["rollout"]
        m = {}
        demos = [self.train[i] for i in self.cursor.take(cfg.rollout.prompts_per_iteration)]
        samples, probe = sample_with_probe(rollout, cfg, t, [d.prompt_ids for d in demos], self.heldout)
        seqs = _demo_vs_self(demos, samples.response_ids, samples.n)
        held = None
        if self.heldout:
            held = _demo_vs_self(self.heldout, probe.response_ids, 1)
            held_before = seq_logp(policy.logprobs(held))
            if self.golden is not None:
                m["golden/heldout_policy"] = mean(self.golden([d.prompt_ids for d in self.heldout], probe.response_ids))
        rollout.sleep()
        prev = seq_logp(policy.logprobs(seqs))  # pi_t: the reference of this iteration
        batch = PolicyBatch("dpo", seqs, ref_seq_logp=prev, beta=cfg.policy.dpo_beta)
        stats, skipped = {}, 0.0
        for _ in range(cfg.policy.epochs):
            for part in batch.split(cfg.policy.mini_batches):
                stats = policy.update(part)
                skipped += stats.get("nonfinite", 0.0)
        m |= {f"policy/{k}": v for k, v in stats.items()} | {"policy/nonfinite": skipped}
        if held is not None:
            m |= {f"heldout/{k}": v for k, v in implicit_reward_accuracy(
                seq_logp(policy.logprobs(held)), held_before, cfg.policy.dpo_beta).items()}
        return m | {f"sync/{k}": v for k, v in synced(self.system.sync, self.guard, t).items()}


class DirectAIHF(Baseline):
    """seeds/004's special cases of AIHF (Eq. 23-24) with the policy as the reward (``run.aihf_form``):

        rpo:   max_theta  gamma E_{(x,y)~D_demo}[log pi(y|x)]
                          + alpha E_{(x,y_w,y_l)~D_pref}[ell(beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l))]
        spac:  max_theta  gamma E_{(x,y)~D_demo, y'~pi_t}[ell(beta log pi(y)/pi_ref(y) - beta log pi(y')/pi_ref(y'))]
                          + alpha (the same preference term)

    ell = log sigmoid, gamma = reward.demo_weight, alpha = reward.preference_weight, beta = policy.dpo_beta,
    pi_ref = the starting policy (model.reference overrides). Each iteration is one optimizer step on
    policy.pairs_per_step preference pairs and rollout.prompts_per_iteration demonstrations (spac: rollout.n
    samples of each from pi_t, then the new weights go to the engines). Where the code differs from the
    seed: rpo's demonstration term is the per-token mean NLL (the seed writes the sequence log-likelihood),
    which keeps gamma on the DPO term's scale, as TRL's rpo_alpha does. Held out: the preference pairs'
    implicit-reward accuracy against pi_ref (and, spac, the golden reward of a pi_t sample per prompt)."""

    report_keys = ["policy/loss", "policy/accuracy", "policy/demo_nll", "heldout/implicit_reward_accuracy",
                   "heldout/implicit_reward_margin", "golden/heldout_policy"]

    def __init__(self, cfg: Config, rd: RunDir, echo=print):
        super().__init__(cfg, rd, echo)
        self.form = cfg.run.aihf_form
        self.roles = ("policy", "reference") + (("rollout",) if self.form == "spac" else ())
        self.train, self.heldout = build_data(cfg, self.tokenizer)
        self.prefs, held = build_preferences(cfg, self.tokenizer)
        self.held = pair_sequences(*zip(*[(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in held])) \
            if held else None
        self.golden = load_golden(cfg.run.golden_reward, self.tokenizer, cfg.run.golden_format,
                                  prompt_messages(self.train, self.heldout))

    def probe(self) -> list:
        return self.heldout[:4] if self.form == "spac" else []

    def paths(self, model: str) -> dict[str, str]:
        from afd_ray.models.loading import resolve_model_path

        ref = resolve_model_path(self.cfg.model.reference) if self.cfg.model.reference else self.start_path
        return {"policy": model, "reference": ref} | ({"rollout": model} if self.form == "spac" else {})

    def begin(self) -> None:
        self.policy, self.reference = self.system.handles["policy"], self.system.handles["reference"]
        self.held_ref = seq_logp(self.reference.logprobs(self.held)) if self.held else None
        if self.form == "spac":
            self.system.sync.check()

    def step(self, t: int) -> dict[str, float]:
        cfg, m = self.cfg, {}
        gamma, alpha = cfg.reward.demo_weight, cfg.reward.preference_weight
        demos = [self.train[i] for i in self.cursor.take(cfg.rollout.prompts_per_iteration)]
        prefs = [self.prefs[i] for i in self.pref_cursor.take(cfg.policy.pairs_per_step)]
        seqs = pair_sequences([p.prompt_ids for p in prefs], [p.chosen_ids for p in prefs],
                              [p.rejected_ids for p in prefs])
        weight, demo_seqs = [alpha] * len(prefs), None
        if self.form == "spac":  # Eq. 24's demonstration-vs-sample pairs as DPO pairs beside the preferences
            rollout = self.system.handles["rollout"]
            samples, probe = sample_with_probe(rollout, cfg, t, [d.prompt_ids for d in demos], self.heldout)
            if probe is not None and self.golden is not None:
                m["golden/heldout_policy"] = mean(self.golden([d.prompt_ids for d in self.heldout],
                                                              probe.response_ids))
            rollout.sleep()
            own = _demo_vs_self(demos, samples.response_ids, samples.n)
            seqs = SequenceBatch(own.prompts + seqs.prompts, own.responses + seqs.responses)
            weight = [gamma] * (len(own) // 2) + weight
        else:  # rpo: the demonstrations' NLL in the same step
            demo_seqs = SequenceBatch([d.prompt_ids for d in demos], [d.response_ids for d in demos])
        batch = PolicyBatch("dpo", seqs, ref_seq_logp=seq_logp(self.reference.logprobs(seqs)),
                            beta=cfg.policy.dpo_beta, pair_weight=torch.tensor(weight, dtype=torch.float32),
                            sft_seqs=demo_seqs, sft_coef=gamma)
        m |= {f"policy/{k}": v for k, v in self.policy.update(batch).items()}
        if self.held:
            m |= {f"heldout/{k}": v for k, v in implicit_reward_accuracy(
                seq_logp(self.policy.logprobs(self.held)), self.held_ref, cfg.policy.dpo_beta).items()}
        if self.form == "spac":
            m |= {f"sync/{k}": v for k, v in synced(self.system.sync, self.guard, t).items()}
        return m


RECIPES = {"dpo": DPO, "ipo": DPO, "bt_rm": BTRewardModel, "spin": SPIN, "aihf": DirectAIHF}


def run(cfg: Config, rd: RunDir, echo=print) -> RunDir:
    """Run a baseline in ``rd`` (new, or continued after its last checkpoint)."""
    if not drive(rd, cfg, RECIPES[cfg.run.method](cfg, rd, echo), echo, line=_line):
        echo(f"stopped after iteration {rd.latest().iteration}; continue with --resume {rd.path}")
    return rd


def _demo_vs_self(demos: list[Encoded], responses: list[list[int]], n: int) -> SequenceBatch:
    """(demonstration, own sample) pairs: each demo paired with each of its n samples."""
    k = len(responses)
    return pair_sequences([demos[j // n].prompt_ids for j in range(k)], [demos[j // n].response_ids for j in range(k)],
                          responses)


# ---- output ----------------------------------------------------------------------------------------------

def _line(m: dict) -> str:
    return "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in m.items() if not k.startswith("time/"))


def write_report(rd: RunDir, cfg: Config, keys: list[str]) -> None:
    from afd_ray.eval.report import metrics_table
    from afd_ray.eval.report import write_report as write

    ms = rd.metrics()
    write(rd.path, f"{cfg.run.method}: {rd.path.name}", [("Per iteration", metrics_table(
        ms, [(k, k.split("/", 1)[1]) for k in keys]))],
          intro=f"model `{cfg.model.start()}`, demonstrations `{cfg.data.demonstrations}`, "
                f"preferences `{cfg.data.preferences or '-'}`, {len(ms)} iterations.")
