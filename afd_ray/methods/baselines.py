"""The baselines, on the same actors as the IRL loop (DESIGN.md Sec. 1):

- ``dpo`` / ``ipo``: offline preference optimisation against pi_ref = pi_SFT (seeds/004 Eq. 18; IPO);
- ``bt_rm``: a Bradley-Terry reward model from preferences (seeds/004 Eq. 5);
- ``spin``: self-play fine-tuning (seeds/004 Protocol 2): each iteration pairs demonstrations (winners)
  with the current policy's own samples (losers) and takes DPO steps against the previous iterate pi_t.

(``aihf`` is the IRL loop with preference pairs mixed into its reward step: ``afd_ray.driver``.)
Each writes ``metrics.jsonl`` per iteration, ``report.md`` and the trained model (``policy/`` or
``reward_model/``) into its run directory.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from afd_ray import toy
from afd_ray.config import Config
from afd_ray.data.tokenize import Encoded, EncodedPreference, TruncationRules
from afd_ray.eval.golden import load_golden
from afd_ray.replay import DataCursor
from afd_ray.types import PairBatch, PolicyBatch, SequenceBatch

log = logging.getLogger("afd_ray")


# ---- data ------------------------------------------------------------------------------------------------

def build_preferences(cfg: Config, tokenizer) -> tuple[list[EncodedPreference], list[EncodedPreference]]:
    """Tokenised preference pairs, shuffled with the run seed, split into (train, held-out)."""
    if cfg.data.preferences in toy.SOURCES:
        encoded = toy.make_preferences(tokenizer, cfg.data.limit or 1024, seed=cfg.run.seed,
                                       eos=toy.SOURCES[cfg.data.preferences])
    else:
        from afd_ray.data.readers import load_preferences
        from afd_ray.data.tokenize import encode_preferences

        loaded = load_preferences(cfg.data.preferences, cfg.data.split or None, cfg.data.on_bad_row,
                                  cfg.data.limit or None)
        rules = TruncationRules(cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, cfg.data.prompt_overflow,
                                cfg.data.response_overflow, cfg.data.on_bad_row)
        encoded, skipped = encode_preferences(tokenizer, loaded.items, rules)
        if loaded.num_skipped or skipped:
            log.warning("preferences: skipped %s while reading and %s while tokenising", loaded.skipped, skipped)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(cfg.run.seed + 1)).tolist()
    encoded = [encoded[i] for i in order]
    k = min(cfg.data.heldout, len(encoded) // 2)
    return encoded[k:], encoded[:k]


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

RESUMABLE = ("dpo", "ipo", "bt_rm", "spin")


def run(cfg: Config, echo=print, rd=None):
    """Run a baseline into a new run directory, or continue ``rd`` after its last checkpoint."""
    from afd_ray.models.loading import load_tokenizer, resolve_model_path
    from afd_ray.run import RunDir, ensure_ray

    recipes = {"dpo": run_dpo, "ipo": run_dpo, "bt_rm": run_bt_rm, "spin": run_spin}
    if cfg.run.method not in recipes:
        raise ValueError(f"run.method={cfg.run.method!r} is not a baseline; baselines: {sorted(recipes)}")
    start = resolve_model_path(cfg.model.sft or cfg.model.policy)
    tokenizer = load_tokenizer(start)
    rd = rd or RunDir.create(cfg)
    ensure_ray()
    try:
        recipes[cfg.run.method](cfg, rd, start, tokenizer, echo)
    finally:
        rd.close()
    return rd


@dataclass
class Progress:
    """Where a baseline run stands: the next iteration, the data cursor, and the learner to checkpoint.

    Checkpoints (every ``run.checkpoint_every`` iterations and after the last) hold the learner's DeepSpeed
    state and HF model plus ``loop.pt``; ``resume`` restores them, so a stopped run continues exactly."""

    rd: object
    cfg: Config
    name: str  # "policy" or "reward"
    cursor: DataCursor
    tokenizer_path: str
    first: int = 1
    last_path: Path | None = None

    @classmethod
    def open(cls, rd, cfg: Config, name: str, size: int, tokenizer_path: str) -> Progress:
        p = cls(rd, cfg, name, DataCursor(size, seed=cfg.run.seed), tokenizer_path)
        latest = rd.latest()
        if latest is not None:
            t, path = latest
            loop = torch.load(path / "loop.pt", weights_only=False)
            p.cursor, p.first, p.last_path = DataCursor(**loop["cursor"]), t + 1, path
        rd.truncate_metrics(p.first - 1)  # iterations after the last checkpoint run again
        return p

    def model_path(self, default: str) -> str:
        """The model to build the actors from: the last checkpoint's, or ``default`` on a fresh run."""
        return str(self.last_path / self.name) if self.last_path else default

    def load_state(self, group) -> None:
        if self.last_path:
            group.load(str(self.last_path / f"{self.name}_state"))

    def end(self) -> int:
        c = self.cfg.run
        return min(c.iterations, self.first - 1 + c.stop_after) if c.stop_after else c.iterations

    def after(self, t: int, m: dict, group, echo) -> None:
        """Log iteration t; checkpoint when it is due."""
        self.rd.append_metrics(m)
        echo(_line(m))
        if t % self.cfg.run.checkpoint_every == 0 or t == self.end():
            tmp = self.rd.begin(t)
            group.save(str(tmp / f"{self.name}_state"), str(tmp / self.name), self.tokenizer_path)
            torch.save({"cursor": asdict(self.cursor), "iteration": t}, tmp / "loop.pt")
            self.rd.commit(t, tmp, self.cfg.run.keep_checkpoints)

    def finish(self, echo, write) -> bool:
        """After the loop: the final model under the run directory and the report when the run is complete."""
        latest = self.rd.latest()
        if latest is None or latest[0] < self.cfg.run.iterations:
            echo(f"stopped after iteration {latest[0] if latest else 0}; continue with --resume {self.rd.path}")
            return False
        final = self.rd.path / ("policy" if self.name == "policy" else "reward_model")
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(latest[1] / self.name, final)
        write()
        echo(f"done: {self.rd.path} ({self.rd.path / 'report.md'})")
        return True


def run_dpo(cfg: Config, rd, start: str, tokenizer, echo) -> None:
    """Offline DPO / IPO on data.preferences: run.iterations steps of policy.pairs_per_step pairs, against
    pi_ref = the starting policy (model.reference overrides); held-out implicit-reward accuracy each step."""
    from afd_ray.models.loading import resolve_model_path
    from afd_ray.run import System

    train, heldout = build_preferences(cfg, tokenizer)
    ref = resolve_model_path(cfg.model.reference) if cfg.model.reference else start
    prog = Progress.open(rd, cfg, "policy", len(train), start)
    system = System(cfg, {"policy": prog.model_path(start), "reference": ref}, tokenizer, [],
                    roles=("policy", "reference"))
    held = pair_sequences(*zip(*[(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in heldout])) if heldout else None
    try:
        policy, reference = system.handles["policy"], system.handles["reference"]
        prog.load_state(policy)
        held_ref = seq_logp(reference.logprobs(held)) if held else None
        for t in range(prog.first, prog.end() + 1):
            chunk = [train[i] for i in prog.cursor.take(cfg.policy.pairs_per_step)]
            seqs = pair_sequences([p.prompt_ids for p in chunk], [p.chosen_ids for p in chunk],
                                  [p.rejected_ids for p in chunk])
            batch = PolicyBatch("dpo", seqs, ref_seq_logp=seq_logp(reference.logprobs(seqs)), beta=cfg.policy.dpo_beta,
                                loss_type=cfg.run.method)
            m = {"iteration": float(t)} | {f"policy/{k}": v for k, v in policy.update(batch).items()}
            if held:
                m |= {f"heldout/{k}": v for k, v in implicit_reward_accuracy(
                    seq_logp(policy.logprobs(held)), held_ref, cfg.policy.dpo_beta).items()}
            prog.after(t, m, policy, echo)
    finally:
        system.shutdown()
    prog.finish(echo, lambda: write_report(rd, cfg, ["policy/loss", "policy/accuracy", "policy/margin",
                                                     "heldout/implicit_reward_accuracy",
                                                     "heldout/implicit_reward_margin"]))


def run_bt_rm(cfg: Config, rd, start: str, tokenizer, echo) -> None:
    """A Bradley-Terry reward model (pairwise loss) on data.preferences: run.iterations steps of
    reward.batch_size pairs; held-out pair accuracy each step."""
    from afd_ray.models.loading import resolve_model_path
    from afd_ray.run import System

    train, heldout = build_preferences(cfg, tokenizer)
    backbone = resolve_model_path(cfg.model.reward) if cfg.model.reward else start
    prog = Progress.open(rd, cfg, "reward", len(train), start)
    system = System(cfg, {"reward": prog.model_path(backbone)}, tokenizer, [], roles=("reward",))
    try:
        rm = system.handles["reward"]
        prog.load_state(rm)
        for t in range(prog.first, prog.end() + 1):
            chunk = [train[i] for i in prog.cursor.take(cfg.reward.batch_size)]
            stats = rm.update(preference_pairs(chunk), "pairwise", cfg.reward.margin)
            m = {"iteration": float(t)} | {f"reward/{k}": v for k, v in stats.items()}
            if heldout:
                m |= {f"heldout/{k}": v for k, v in preference_accuracy(rm, heldout).items()}
            prog.after(t, m, rm, echo)
    finally:
        system.shutdown()
    prog.finish(echo, lambda: write_report(rd, cfg, ["reward/loss", "reward/accuracy", "heldout/preference_accuracy",
                                                     "heldout/reward_gap"]))


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


def run_spin(cfg: Config, rd, start: str, tokenizer, echo) -> None:
    """SPIN: per iteration, the next rollout.prompts_per_iteration demonstrations against rollout.n samples
    each from pi_t, DPO loss with pi_t as the reference (seeds/004 Protocol 2), then sync pi_{t+1} to the
    engines. Held-out: beta*log(pi_{t+1}/pi_t) of the demonstration vs a pi_t sample."""
    from afd_ray.driver import sampling
    from afd_ray.run import System, build_data

    train, heldout = build_data(cfg, tokenizer)
    prog = Progress.open(rd, cfg, "policy", len(train), start)
    path = prog.model_path(start)
    system = System(cfg, {"policy": path, "rollout": path}, tokenizer, heldout[:4], roles=("policy", "rollout"))
    try:
        policy, rollout = system.handles["policy"], system.handles["rollout"]
        prog.load_state(policy)
        golden = load_golden(cfg.run.golden_reward, tokenizer)
        for t in range(prog.first, prog.end() + 1):
            m = {"iteration": float(t)}
            demos = [train[i] for i in prog.cursor.take(cfg.rollout.prompts_per_iteration)]
            samples = rollout.generate([d.prompt_ids for d in demos], sampling(cfg, t))
            n = samples.n
            seqs = _demo_vs_self(demos, samples.response_ids, n)
            held = None
            if heldout:
                probe = rollout.generate([d.prompt_ids for d in heldout], sampling(cfg, -t, n=1))
                held = _demo_vs_self(heldout, probe.response_ids, 1)
                held_before = seq_logp(policy.logprobs(held))
                if golden is not None:
                    m["golden/heldout_policy"] = _mean(golden([d.prompt_ids for d in heldout], probe.response_ids))
            rollout.sleep()
            prev = seq_logp(policy.logprobs(seqs))  # pi_t: the reference of this iteration
            batch = PolicyBatch("dpo", seqs, ref_seq_logp=prev, beta=cfg.policy.dpo_beta)
            stats = {}
            for _ in range(cfg.policy.epochs):
                for part in batch.split(cfg.policy.mini_batches):
                    stats = policy.update(part)
            m |= {f"policy/{k}": v for k, v in stats.items()}
            if held is not None:
                m |= {f"heldout/{k}": v for k, v in implicit_reward_accuracy(
                    seq_logp(policy.logprobs(held)), held_before, cfg.policy.dpo_beta).items()}
            m |= {f"sync/{k}": v for k, v in system.sync.sync().items()}
            prog.after(t, m, policy, echo)
    finally:
        system.shutdown()
    prog.finish(echo, lambda: write_report(rd, cfg, ["policy/loss", "policy/accuracy",
                                                     "heldout/implicit_reward_accuracy",
                                                     "heldout/implicit_reward_margin", "golden/heldout_policy"]))


def _demo_vs_self(demos: list[Encoded], responses: list[list[int]], n: int) -> SequenceBatch:
    """(demonstration, own sample) pairs: each demo paired with each of its n samples."""
    k = len(responses)
    return pair_sequences([demos[j // n].prompt_ids for j in range(k)], [demos[j // n].response_ids for j in range(k)],
                          responses)


# ---- output ----------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def _line(m: dict) -> str:
    return "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in m.items() if not k.startswith("time/"))


def write_report(rd, cfg: Config, keys: list[str]) -> None:
    from afd_ray.run import atomic_write

    ms = rd.metrics()
    keys = [k for k in keys if any(k in m for m in ms)]
    lines = [f"# {cfg.run.method}: {rd.path.name}", "",
             f"model `{cfg.model.sft or cfg.model.policy}`, demonstrations `{cfg.data.demonstrations}`, "
             f"preferences `{cfg.data.preferences or '-'}`, {len(ms)} iterations.", "",
             "| it | " + " | ".join(k.split("/", 1)[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for m in ms:
        lines.append(f"| {m['iteration']:.0f} | " + " | ".join(
            "-" if k not in m else f"{m[k]:.4f}" for k in keys) + " |")
    atomic_write(rd.path / "report.md", "\n".join(lines) + "\n")
