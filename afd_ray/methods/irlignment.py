"""Inverse-RLignment (seeds/000 Sec. 3.2): SFT -> a discriminator reward model -> Best-of-N.

    pi_SFT = SFT(pi_init, D_demo)                                         (sft stage, Ray Train)
    D_phi = argmax E_pos[log D] + E_neg[log(1 - D)],  r = logit D_phi     (Eq. 11-12, data choice of Table 1)
    y_BoN(x) = argmax_{y_1..y_N ~ pi_SFT(.|x)} r(x, y)                     (Best-of-N, Sec. 4.2)

The data choice (``bon.data_choice``) names the discriminator's positive and negative sets (Table 1):
``init_sft`` = pi_SFT samples vs pi_init samples (low heterogeneity, the paper's pick), ``init_demo`` =
demonstrations vs pi_init samples, ``sft_demo`` = demonstrations vs pi_SFT samples. ``bon.compare_choices``
trains the other choices too, each from the reward actor's starting weights (saved once, loaded back), and
runs each one's Best-of-N on the same pool of samples (the same sampling seeds), for Table 1 side by side.

Best-of-N streams: prompts go in batches of ``bon.prompt_batch`` and samples in chunks of
``bon.sample_chunk`` per prompt; only each prompt's running best (``BestOfNState``) survives a chunk, so
N = 1000 over many prompts needs the memory of one chunk. One pool of max(N) samples per prompt gives the
whole curve: the best of the first N samples, for every N of ``bon.n``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from afd_ray.algo.selection import BestOfNState
from afd_ray.config import Config
from afd_ray.data.build import build_data
from afd_ray.data.tokenize import Encoded
from afd_ray.progress import bar
from afd_ray.runtime.files import atomic_write
from afd_ray.runtime.guard import NonFiniteError, finite
from afd_ray.runtime.loop import drive, summary_line
from afd_ray.runtime.rundir import RunDir
from afd_ray.runtime.system import System, ensure_ray, once_spec, sample_once
from afd_ray.types import PairBatch, Samples, SamplingSpec, SequenceBatch

log = logging.getLogger("afd_ray")

DATA_CHOICES = {  # Table 1 of seeds/000: (positive source, negative source)
    "init_sft": ("sft", "init"),
    "init_demo": ("demo", "init"),
    "sft_demo": ("demo", "sft"),
}


def discriminator_data(choice: str, demos: list[Encoded], init: list[list[int]] | None,
                       sft: list[list[int]] | None) -> PairBatch:
    """The discriminator's training set for ``choice``: positives as ``chosen``, negatives as ``rejected``,
    row i of both on the prompt of ``demos[i]``.

    init, sft: one sampled response per demo prompt from pi_init / pi_SFT (only the sources the choice
    names are needed). Raises ValueError on an unknown choice or a missing / misaligned source.
    """
    if choice not in DATA_CHOICES:
        raise ValueError(f"bon.data_choice={choice!r}; choose one of {sorted(DATA_CHOICES)}")
    sources = {"demo": [d.response_ids for d in demos], "init": init, "sft": sft}
    pos, neg = (sources[s] for s in DATA_CHOICES[choice])
    for name, rows in zip(DATA_CHOICES[choice], (pos, neg)):
        if rows is None or len(rows) != len(demos):
            raise ValueError(f"data choice {choice} needs one {name} response per prompt ({len(demos)}), got "
                             f"{'none' if rows is None else len(rows)}")
    prompts = [d.prompt_ids for d in demos]
    return PairBatch(SequenceBatch(prompts, list(pos)), SequenceBatch(prompts, list(neg)))


@dataclass
class BoNRow:
    """Best-of-N over a set of prompts: the selected responses' learned reward and golden reward."""

    n: int
    reward: list[float] = field(default_factory=list)
    golden: list[float] = field(default_factory=list)
    wins_vs_plain: float = 0.0  # golden(BoN) > golden(plain sample): 1, equal: 1/2
    wins_vs_greedy: float | None = None  # golden(BoN) against golden(greedy response), seeds/000 Fig. 4

    def summary(self) -> dict[str, float]:
        k = max(len(self.reward), 1)
        out = {"n": self.n, "prompts": len(self.reward), "reward": sum(self.reward) / k}
        if self.golden:
            mean = sum(self.golden) / len(self.golden)
            var = sum((g - mean) ** 2 for g in self.golden) / max(len(self.golden) - 1, 1)
            out |= {"golden": mean, "golden_se": math.sqrt(var / len(self.golden)),
                    "win_rate_vs_plain": self.wins_vs_plain / len(self.golden)}
            if self.wins_vs_greedy is not None:
                out["win_rate_vs_greedy"] = self.wins_vs_greedy / len(self.golden)
        return out


def best_of_n(generate: Callable[[list[list[int]], SamplingSpec], Samples],
              score: Callable[[SequenceBatch], torch.Tensor], prompts: list[list[int]], ns: list[int],
              spec: SamplingSpec, prompt_batch: int, sample_chunk: int,
              golden: Callable[[list[list[int]], list[list[int]]], list[float]] | None = None,
              sink: Callable[[int, list[list[int]], list[list[int]], list[float]], None] | None = None,
              greedy_golden: list[float] | None = None) -> dict[int, BoNRow]:
    """The Best-of-N curve for every N in ``ns`` (increasing), streamed (module docstring).

    Sample j of prompt i comes from the chunk that covers j; chunk boundaries fall on every N of ``ns``,
    so the first chunk is one plain sample per prompt with ``spec.seed``: N = 1 *is* plain sampling.
    ``sink(n, prompts, responses, rewards)`` receives each prompt batch's selection for each N (to write
    it out) instead of it being kept. ``greedy_golden``: the golden reward of each prompt's deterministic
    (greedy) response, which seeds/000 Fig. 4 takes as the baseline of its win rates.
    """
    from afd_ray.eval.golden import win_rate

    rows = {n: BoNRow(n, wins_vs_greedy=None if greedy_golden is None else 0.0) for n in ns}
    with bar(len(prompts) * ns[-1], "Best-of-N", unit="sample") as progress:
        for lo in range(0, len(prompts), prompt_batch):
            batch = prompts[lo:lo + prompt_batch]
            state, best = BestOfNState.empty(len(batch)), [None] * len(batch)
            plain_golden = None
            chunk_id = 0
            for n in ns:
                while state.seen < n:
                    c = min(sample_chunk, n - state.seen)
                    seed = None if spec.seed is None else spec.seed + 10_007 * chunk_id + lo
                    s = generate(batch, SamplingSpec(n=c, temperature=spec.temperature, top_p=spec.top_p,
                                                     max_tokens=spec.max_tokens, seed=seed))
                    r = score(SequenceBatch([p for p in batch for _ in range(c)], s.response_ids)).view(len(batch), c)
                    before = state.seen
                    improved = state.update(r)
                    for i in improved.nonzero().flatten().tolist():
                        best[i] = s.response_ids[i * c + int(state.index_P[i]) - before]
                    chunk_id += 1
                    progress.update(len(batch) * c)
                chosen = list(best)
                row = rows[n]
                row.reward += state.reward_P.tolist()
                if golden is not None:
                    g = golden(batch, chosen)
                    if plain_golden is None:
                        plain_golden = g  # the first N's selection: with ns[0] = 1, the plain sample
                    row.golden += g
                    row.wins_vs_plain += win_rate(g, plain_golden)[0] * len(g)
                    if greedy_golden is not None:
                        row.wins_vs_greedy += win_rate(g, greedy_golden[lo:lo + len(batch)])[0] * len(g)
                if sink is not None:
                    sink(n, batch, chosen, state.reward_P.tolist())
    return rows


class SelectionWriter:
    """Selected responses per N as jsonl (bon/N{n}.jsonl), written to temp files and renamed on close."""

    def __init__(self, out_dir: Path, tokenizer, ns: list[int]):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.files = {n: open(self.dir / f".N{n}.jsonl.tmp", "w") for n in ns}

    def __call__(self, n: int, prompts: list[list[int]], responses: list[list[int]], rewards: list[float]) -> None:
        f = self.files[n]
        for p, r, s in zip(prompts, responses, rewards):
            f.write(json.dumps({"prompt": self.tokenizer.decode(p, skip_special_tokens=True),
                                "response": self.tokenizer.decode(r, skip_special_tokens=True),
                                "reward": s, "response_ids": r}) + "\n")

    def close(self) -> None:
        for n, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.dir / f".N{n}.jsonl.tmp", self.dir / f"N{n}.jsonl")


def train_discriminator(reward, pairs: PairBatch, cfg: Config) -> dict[str, float]:
    """BCE discriminator (seeds/000 Eq. 11) over ``pairs`` for ``bon.rm_epochs`` passes in batches of
    ``reward.batch_size``; returns the last step's stats plus the mean training accuracy of the last pass."""
    g = torch.Generator().manual_seed(cfg.run.seed)
    stats, accs, skipped = {}, [], 0.0
    for _ in range(cfg.bon.rm_epochs):
        order = torch.randperm(len(pairs), generator=g).tolist()
        accs = []
        for lo in range(0, len(order), cfg.reward.batch_size):
            idx = order[lo:lo + cfg.reward.batch_size]
            chunk = PairBatch(SequenceBatch([pairs.chosen.prompts[i] for i in idx],
                                            [pairs.chosen.responses[i] for i in idx]),
                              SequenceBatch([pairs.rejected.prompts[i] for i in idx],
                                            [pairs.rejected.responses[i] for i in idx]))
            stats = reward.update(chunk, "discriminator", 0.0)
            accs.append(stats["accuracy"])
            skipped += stats.get("nonfinite", 0.0)  # steps DeepSpeed skipped for NaN/inf gradients
    return {**stats, "nonfinite_skips": skipped, "train_accuracy_last_epoch": sum(accs) / max(len(accs), 1)}


def checked(score: Callable[[SequenceBatch], torch.Tensor]) -> Callable[[SequenceBatch], torch.Tensor]:
    """``score`` that stops with an error on a non-finite reward (a NaN would silently lose every
    comparison of the Best-of-N selection)."""
    def score_checked(seqs: SequenceBatch) -> torch.Tensor:
        r = score(seqs)
        if not finite(r.tolist()):
            raise NonFiniteError("reward: the discriminator's scores are not finite; Best-of-N stops here. Look at "
                                 "reward.lr and the discriminator's training metrics in bon.json.")
        return r
    return score_checked


# ---- the recipe ------------------------------------------------------------------------------------------

def bon_sampling(cfg: Config) -> SamplingSpec:
    """How Best-of-N samples pi_SFT (its first chunk, N = 1, is exactly this plain sampling)."""
    return SamplingSpec(n=1, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_tokens=cfg.rollout.max_new_tokens, seed=cfg.run.seed * 1_000_003 + 29)


def run(cfg: Config, rd: RunDir, echo=print) -> RunDir:
    """SFT (unless model.sft is given) -> discriminator -> Best-of-N curve [-> RL on the learned reward].

    A rerun in the same run directory continues: SFT after its last Ray Train checkpoint, the
    discriminator and Best-of-N are kept once ``bon.json`` is written, the RL stage after its last
    checkpoint (it runs in the runtime's loop, with recovery)."""
    from afd_ray.data.render import prompt_messages
    from afd_ray.eval.golden import load_golden
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    init = resolve_model_path(cfg.model.policy)
    tokenizer = load_tokenizer(init)
    train, heldout = build_data(cfg, tokenizer)
    if not heldout:
        raise ValueError("inverse_rlignment evaluates Best-of-N on held-out prompts: set data.heldout > 0")
    golden = load_golden(cfg.run.golden_reward, tokenizer, cfg.run.golden_format, prompt_messages(train, heldout))
    judge = None
    if cfg.judge.base_url:  # first: a key that must not go to this URL stops the run before any work
        from afd_ray.eval.judge import PairwiseJudge

        judge = PairwiseJudge(**dataclasses.asdict(cfg.judge))
    ensure_ray()
    done = rd.path / "bon.json"
    kept = json.loads(done.read_text()) if done.is_file() and (rd.path / "reward_model" / "config.json").is_file() \
        else None
    if kept is not None and _stage_config(kept["config"]) == _stage_config(cfg.to_dict()):
        echo(f"discriminator and Best-of-N already done in {rd.path}")
    else:
        kept = None
    result = discriminator_and_best_of_n(cfg, rd, init, tokenizer, train, heldout, golden, echo, kept)
    critics = critic_tables(cfg, rd, [d.prompt_ids for d in bon_prompts(cfg, heldout)], golden, judge,
                            result.get("critics"), echo)
    if critics is not None and critics != result.get("critics"):
        result["critics"] = critics
        atomic_write(done, json.dumps(result, indent=1))
    if cfg.bon.rl_iterations:
        rl = rl_on_learned_reward(cfg, rd, result["sft_path"], echo)
        if rl is None:
            return rd
        result["rl"] = rl
    write_report(rd, cfg, result)
    echo(f"done: {rd.path} ({rd.path / 'report.md'})")
    return rd


def _stage_config(d: dict) -> dict:
    """What the discriminator and Best-of-N depend on: everything but the run's bookkeeping (a resume that
    changes only run.*, the judge, the critics' N or the RL stage's iterations keeps them) and the passes
    beside them (bon.compare_choices, bon.compare_reward: a rerun adds the missing ones)."""
    beside = ("rl_iterations", "critic_n", "compare_choices", "compare_reward")
    return {k: v for k, v in d.items() if k not in ("run", "judge")} | {
        "bon": {k: v for k, v in d["bon"].items() if k not in beside}}


def discriminator_and_best_of_n(cfg: Config, rd: RunDir, init: str, tokenizer, train, heldout, golden, echo,
                                kept: dict | None = None) -> dict:
    """pi_SFT, the bon.data_choice discriminator (reward_model/) and its Best-of-N (bon/), then the passes beside
    them on the same pool of samples: each bon.compare_choices discriminator (bon_<choice>/) and
    bon.compare_reward (bon_compare/). bon.json is written after each pass, so a failure keeps what is done;
    ``kept`` (a finished bon.json of the same stage config) skips what it holds and runs only what is missing."""
    from afd_ray.models.loading import resolve_model_path

    if kept is not None:
        sft_path = kept["sft_path"]
    elif cfg.model.sft:
        sft_path = resolve_model_path(cfg.model.sft)
    else:
        from afd_ray.sft import train_sft

        echo(f"SFT from {init} on {len(train)} demonstrations (Ray Train)")
        sft_path = str(train_sft(cfg, train, rd.path / "sft", init, heldout=heldout, echo=echo))
    rm_demos = train[: cfg.bon.rm_prompts] if cfg.bon.rm_prompts else train
    eval_demos = bon_prompts(cfg, heldout)
    eval_prompts = [d.prompt_ids for d in eval_demos]
    spec = bon_sampling(cfg)
    done = rd.path / "bon.json"
    result = None if kept is None else {**kept, "config": cfg.to_dict()}
    have = set() if result is None else {cfg.bon.data_choice, *(result.get("choices") or {})}
    choices = [c for c in (cfg.bon.data_choice, *cfg.bon.compare_choices) if c not in have]
    greedy_golden = None
    if choices:
        result, greedy_golden = _discriminator_passes(cfg, rd, init, sft_path, tokenizer, rm_demos, eval_demos,
                                                      golden, choices, result, echo)
    compare_path = resolve_model_path(cfg.bon.compare_reward) if cfg.bon.compare_reward else None
    if compare_path and (result.get("compare") or {}).get("model") != compare_path:
        # seeds/000 Sec. 4.2-4.3: e.g. a Bradley-Terry reward model, on the same pool of pi_SFT's samples
        echo(f"Best-of-N with bon.compare_reward {compare_path}")
        system = System(cfg, {"rollout": sft_path, "reward": compare_path}, tokenizer, [],
                        roles=("rollout", "reward"), fixed_reward=True)
        writer = SelectionWriter(rd.path / "bon_compare", tokenizer, cfg.bon.n)
        try:
            if golden is not None and greedy_golden is None:
                greedy_golden = _greedy_golden(system, eval_prompts, spec, golden)
            rows = best_of_n(system.handles["rollout"].generate, checked(system.handles["reward"].score),
                             eval_prompts, cfg.bon.n, spec, cfg.bon.prompt_batch, cfg.bon.sample_chunk,
                             golden=golden, sink=writer, greedy_golden=greedy_golden)
            writer.close()
        finally:
            system.shutdown()
        result["compare"] = {"model": compare_path, "best_of_n": [rows[n].summary() for n in cfg.bon.n]}
        atomic_write(done, json.dumps(result, indent=1))
    for line in _table(result["best_of_n"]):
        echo(line)
    return result


def _greedy_golden(system: System, prompts: list[list[int]], spec: SamplingSpec, golden) -> list[float]:
    """The golden reward of pi_SFT's deterministic response per prompt (seeds/000 Fig. 4's baseline)."""
    greedy = system.handles["rollout"].generate(prompts, replace(spec, n=1, temperature=0.0, seed=None))
    return golden(prompts, greedy.response_ids)


def _discriminator_passes(cfg: Config, rd: RunDir, init: str, sft_path: str, tokenizer, rm_demos, eval_demos,
                          golden, choices: list[str], result: dict | None, echo) -> tuple[dict, list[float] | None]:
    """One discriminator per data choice, each from the reward model's starting weights (saved once, loaded
    back), and its Best-of-N on the same pool of samples (the same sampling seeds). ``result`` None: the
    first choice is bon.data_choice, saved as reward_model/ and selecting into bon/, and starts bon.json;
    the others go to bon.json's ``choices`` and bon_<choice>/. bon.json is rewritten after each choice.
    Returns the result and the greedy responses' golden reward (None without a golden reward)."""
    from afd_ray.models.loading import resolve_model_path

    done = rd.path / "bon.json"
    eval_prompts = [d.prompt_ids for d in eval_demos]
    prompts = [d.prompt_ids for d in rm_demos + eval_demos]
    needs = {s for c in choices for s in DATA_CHOICES[c]}
    drawn, seed = {}, cfg.run.seed * 1_000_003 + 17
    if "init" in needs:
        echo(f"sampling pi_init on {len(prompts)} prompts")
        drawn["init"] = sample_once(cfg, init, prompts, tokenizer, seed=seed)
    k = len(rm_demos)
    reward_path = resolve_model_path(cfg.model.reward) if cfg.model.reward else init
    spec = bon_sampling(cfg)
    start = rd.path / ".reward_start"
    shutil.rmtree(start, ignore_errors=True)  # a killed run's leftover (another world size's shards)
    system = System(cfg, {"rollout": sft_path, "reward": reward_path}, tokenizer, [], roles=("rollout", "reward"))
    try:
        if "sft" in needs:  # from the Best-of-N engine, which holds pi_SFT already
            echo(f"sampling pi_SFT on {len(prompts)} prompts")
            drawn["sft"] = system.handles["rollout"].generate(prompts, once_spec(cfg, seed)).response_ids
        rm = system.handles["reward"]
        if len(choices) > 1:  # every choice's discriminator starts from the same weights
            rm.save(str(start), None, init)
        greedy_golden = _greedy_golden(system, eval_prompts, spec, golden) if golden is not None else None
        for i, choice in enumerate(choices):
            if i:
                rm.load(str(start))
            primary = result is None
            positive, negative = DATA_CHOICES[choice]
            train_pairs, eval_pairs = (discriminator_data(choice, demos, *(drawn[s][part] if s in drawn else None
                                                                          for s in ("init", "sft")))
                                       for demos, part in ((rm_demos, slice(0, k)), (eval_demos, slice(k, None))))
            echo(f"discriminator ({choice}: {positive} vs {negative}) on {len(train_pairs)} pairs")
            stats = train_discriminator(rm, train_pairs, cfg)
            score = checked(rm.score)
            r_pos, r_neg = score(eval_pairs.chosen), score(eval_pairs.rejected)
            disc = {"discriminator/" + k: v for k, v in stats.items()} | {
                "discriminator/heldout_accuracy": float(((r_pos > 0).float().mean() + (r_neg < 0).float().mean()) / 2),
                "discriminator/heldout_pairwise_accuracy": float((r_pos > r_neg).float().mean())}
            echo("  " + "  ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in disc.items() if "accuracy" in k))
            if primary:
                rm.save(str(rd.path / ".reward_state"), str(rd.path / "reward_model"), init)
                shutil.rmtree(rd.path / ".reward_state", ignore_errors=True)
            writer = SelectionWriter(rd.path / ("bon" if primary else f"bon_{choice}"), tokenizer, cfg.bon.n)
            echo(f"Best-of-N ({choice}) for N in {cfg.bon.n} on {len(eval_demos)} held-out prompts")
            rows = best_of_n(system.handles["rollout"].generate, score, eval_prompts, cfg.bon.n, spec,
                             cfg.bon.prompt_batch, cfg.bon.sample_chunk, golden=golden, sink=writer,
                             greedy_golden=greedy_golden)
            writer.close()
            table = [rows[n].summary() for n in cfg.bon.n]
            if primary:
                demo_golden = None
                if golden is not None:
                    g = golden(eval_prompts, [d.response_ids for d in eval_demos])
                    demo_golden = sum(g) / len(g)
                result = {"config": cfg.to_dict(), "sft_path": sft_path, **disc, "best_of_n": table,
                          "golden_demonstrations": demo_golden,
                          "golden_greedy": sum(greedy_golden) / len(greedy_golden) if greedy_golden else None,
                          "compare": None, "choices": None}
            else:
                first = {k: v for k, v in result.items() if k.startswith("discriminator/")}
                result["choices"] = {cfg.bon.data_choice: {**first, "best_of_n": result["best_of_n"]},
                                     **(result.get("choices") or {}), choice: {**disc, "best_of_n": table}}
            atomic_write(done, json.dumps(result, indent=1))
    finally:
        system.shutdown()
        shutil.rmtree(start, ignore_errors=True)
    return result, greedy_golden


def bon_prompts(cfg: Config, heldout: list[Encoded]) -> list[Encoded]:
    """The held-out demonstrations whose prompts Best-of-N and the critics take (bon.prompts; 0 = all)."""
    return heldout[: cfg.bon.prompts] if cfg.bon.prompts else heldout


CRITIC_POLICIES = (("BoN IRL-RM", "bon"), ("BoN compare_reward", "bon_compare"))


def critic_tables(cfg: Config, rd: RunDir, prompts: list[list[int]], golden, judge, kept: dict | None,
                  echo) -> dict | None:
    """seeds/000 Table 2: the Best-of-N selections at N = bon.critic_n of the discriminator (IRL-RM) and of
    bon.compare_reward, and pi_SFT's plain sample (N = 1, the "SFT" column), compared pairwise (each pair
    once) by the golden reward and by the judge (both orders, afd_ray.eval.judge). Read from the selection
    files, so a rerun that changes only the judge or the N judges again without sampling again; a kept
    judge result for the same judge and N is reused. None when fewer than two policies are there or no
    critic is set."""
    from afd_ray.eval.golden import golden_comparison

    if golden is None and judge is None:
        return None
    n = cfg.bon.critic_n or cfg.bon.n[-1]
    files = {name: rd.path / folder / f"N{n}.jsonl" for name, folder in CRITIC_POLICIES}
    if n != 1 and 1 in cfg.bon.n:
        files["SFT"] = rd.path / "bon" / "N1.jsonl"
    rows = {name: [json.loads(line) for line in f.read_text().splitlines()] for name, f in files.items()
            if f.is_file()}
    if len(rows) < 2:
        return None
    for name, got in rows.items():
        if len(got) != len(prompts):
            raise ValueError(f"{files[name]}: {len(got)} selections for {len(prompts)} Best-of-N prompts; the "
                             f"file is from another configuration. Delete bon.json to draw Best-of-N again.")
    names = list(rows)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    out: dict = {"n": n, "policies": names, "pairs": [list(p) for p in pairs]}
    if golden is not None:
        g = {name: golden(prompts, [r["response_ids"] for r in got]) for name, got in rows.items()}
        out["golden"] = [golden_comparison(g[a], g[b]).summary() for a, b in pairs]
    if judge is not None:
        setting = {"model": cfg.judge.model, "base_url": cfg.judge.base_url, "template": cfg.judge.template}
        if kept and kept.get("judge_setting") == setting and kept.get("n") == n and kept.get("policies") == names:
            out["judge"], out["judge_setting"] = kept["judge"], setting
        else:
            texts = {name: [r["response"] for r in got] for name, got in rows.items()}
            prompt_text = [r["prompt"] for r in rows[names[0]]]
            echo(f"judge {cfg.judge.model} on {len(pairs)} pairs of Best-of-N selections (N = {n}), both orders")
            out["judge"] = [judge.compare(prompt_text, texts[a], texts[b], desc=f"judge {a} vs {b}").summary()
                            for a, b in pairs]
            out["judge_setting"] = setting
    return out


def rl_on_learned_reward(cfg: Config, rd: RunDir, sft_path: str, echo) -> dict | None:
    """The IRL loop's policy step on the fixed discriminator reward (no reward updates), from pi_SFT, in
    the runtime (checkpoints every run.checkpoint_every, resume, recovery); the final policy is saved as
    ``rl_policy/``. Returns the final held-out diagnostics, or None when stopped early (run.stop_after)."""
    from afd_ray.methods.irl import IRL

    rl_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, iterations=cfg.bon.rl_iterations),
                                 model=dataclasses.replace(cfg.model, policy=sft_path, reference="", reward=""))
    paths = {"reward": str(rd.path / "reward_model")}
    if cfg.critic.enabled:  # ppo with a critic: the value model starts from the learned reward model
        paths["critic"] = cfg.critic.model or str(rd.path / "reward_model")
    final: dict = {}

    def report(rd_, cfg_, metrics):  # after the last iteration, with the actors still up
        final.update(metrics)
        recipe.system.handles["policy"].save(str(rd.path / ".policy_state"), str(rd.path / "rl_policy"), sft_path)
        shutil.rmtree(rd.path / ".policy_state", ignore_errors=True)

    recipe = IRL(rl_cfg, rd, lambda *_: None, learn_reward=False, paths=paths, report=report)
    if not drive(rd, rl_cfg, recipe, echo, line=lambda m: "rl " + summary_line(m)):
        echo(f"stopped after RL iteration {rd.latest().iteration}; continue with --resume {rd.path}")
        return None
    return final


def _table(table: list[dict]) -> list[str]:
    """The Best-of-N curve (seeds/000 Fig. 4's golden reward and win rates against greedy, per N)."""
    has_golden = any("golden" in r for r in table)
    has_greedy = any("win_rate_vs_greedy" in r for r in table)
    head = ("| N | learned reward |" + (" golden reward (± s.e.) | win rate vs N=1 |" if has_golden else "")
            + (" win rate vs greedy |" if has_greedy else ""))
    lines = [head, "|---|---|" + ("---|---|" if has_golden else "") + ("---|" if has_greedy else "")]
    for r in table:
        line = f"| {r['n']} | {r['reward']:+.3f} |"
        if has_golden:
            line += f" {r['golden']:.3f} ± {r['golden_se']:.3f} | {r['win_rate_vs_plain']:.3f} |"
        if has_greedy:
            line += f" {r['win_rate_vs_greedy']:.3f} |"
        lines.append(line)
    return lines


def _choices_table(choices: dict[str, dict]) -> list[str]:
    """Each data choice's discriminator (held-out pairwise accuracy) and Best-of-N golden reward per N (the
    learned reward's scale differs per choice, so without a golden reward only the accuracies compare)."""
    names = list(choices)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| held-out pairwise accuracy | " + " | ".join(
                 f"{choices[c]['discriminator/heldout_pairwise_accuracy']:.3f}" for c in names) + " |"]
    for j, row in enumerate(choices[names[0]]["best_of_n"]):
        if "golden" in row:
            lines.append(f"| golden reward, N = {row['n']} | " + " | ".join(
                f"{choices[c]['best_of_n'][j]['golden']:.3f} ± {choices[c]['best_of_n'][j]['golden_se']:.3f}"
                for c in names) + " |")
    return lines


def write_report(rd: RunDir, cfg: Config, result: dict) -> None:
    from afd_ray.eval.report import pairwise_lines, plot_best_of_n_curves
    from afd_ray.eval.report import write_report as write

    disc = [f"- {k.split('/', 1)[1]}: {v:.4f}" for k, v in result.items() if k.startswith("discriminator/")]
    bon = _table(result["best_of_n"])
    if result.get("golden_demonstrations") is not None:
        bon += ["", f"Demonstrations' golden reward on these prompts: {result['golden_demonstrations']:.3f}"]
    if result.get("golden_greedy") is not None:
        bon += [f"pi_SFT's greedy responses' golden reward (the win rates' baseline, seeds/000 Fig. 4): "
                f"{result['golden_greedy']:.3f}"]
    sections = [("Discriminator (seeds/000 Eq. 11-12)", disc), ("Best-of-N with pi_SFT samples (held-out prompts)", bon)]
    if result.get("compare"):
        sections.append((f"Best-of-N with bon.compare_reward `{result['compare']['model']}` (the same samples)",
                         _table(result["compare"]["best_of_n"])))
    if result.get("choices"):
        sections.append(("Data choices side by side (seeds/000 Table 1, the same samples)",
                         _choices_table(result["choices"])))
    critics = result.get("critics")
    if critics:
        said = {"BoN IRL-RM": f"the discriminator's selection at N = {critics['n']}",
                "BoN compare_reward": f"`{cfg.bon.compare_reward}`'s selection at that N from the same samples",
                "SFT": "pi_SFT's plain sample (N = 1)"}
        what = "; ".join(f"{name}: {said[name]}" for name in critics["policies"]) + (
            ". Row against column; standard errors in parentheses.")
        for critic, heading in (("golden", "Critic: the golden reward (seeds/000 Table 2's layout)"),
                                ("judge", f"Critic: the judge `{critics.get('judge_setting', {}).get('model')}` "
                                          f"(seeds/000 Table 2, both orders)")):
            if critic in critics:
                sections.append((heading, [what, ""] + pairwise_lines(critics["policies"], critics["pairs"],
                                                                      critics[critic])))
    if "rl" in result:
        sections.append(("RL on the learned reward (final policy, held-out prompts)",
                         [f"- {k}: {v:.4f}" for k, v in sorted(result["rl"].items())]))
    plots = None
    if all("golden" in r for r in result["best_of_n"]):  # seeds/000 Fig. 4
        curves = {"IRL-RM": result["best_of_n"]} if not result.get("choices") else {
            f"IRL-RM {choice}": side["best_of_n"] for choice, side in result["choices"].items()}
        if result.get("compare"):
            curves["compare_reward"] = result["compare"]["best_of_n"]
        plots = {"best_of_n.png": plot_best_of_n_curves(curves, rd.path / "best_of_n.png",
                                                         "Best-of-N from pi_SFT (seeds/000 Fig. 4)")}
    write(rd.path, f"Inverse-RLignment: {rd.path.name}", sections, plots=plots,
          intro=f"pi_init `{cfg.model.policy}`, pi_SFT `{result['sft_path']}`, demonstrations "
                f"`{cfg.data.demonstrations}`, discriminator data `{cfg.bon.data_choice}`.")
