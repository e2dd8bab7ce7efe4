"""The bi-level IRL recipe (``irl``, and ``aihf`` with preference pairs in its reward step) in the runtime:
data, actors, the loop (``afd_ray.driver``), checkpoints, final evaluation and report. ``rlhf`` is the same
loop on a fixed reward (seeds/004 Protocol 3): the frozen ``model.reward`` and/or the rule rewards of
``reward.functions`` (afd_ray.rewards), no reward step; without ``model.reward`` there is no reward actor.

A checkpoint of iteration t holds the policy, reward (and critic) models in HF format and their DeepSpeed
states (weights, optimizer, RNG), plus ``loop.pt``: the data cursors and the pair replay.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from afd_ray.config import Config
from afd_ray.data.build import build_data, build_preferences
from afd_ray.data.render import prompt_messages
from afd_ray.driver import (
    Ahead,
    Collaborators,
    LoopState,
    PreferenceData,
    heldout_diagnostics,
    heldout_sample,
    irl_iteration,
)
from afd_ray.eval.golden import load_golden
from afd_ray.replay import DataCursor, PairReplay
from afd_ray.runtime.card import write_model_card
from afd_ray.runtime.guard import NonFiniteGuard
from afd_ray.runtime.loop import drive
from afd_ray.runtime.rundir import Checkpoint, RunDir
from afd_ray.runtime.system import ROLES, System, ensure_ray
from afd_ray.types import Samples

LEARNERS = ("policy", "reward", "critic")
log = logging.getLogger("afd_ray")


def save_loop_state(tmp: Path, state: LoopState, t: int, guard: NonFiniteGuard) -> None:
    """loop.pt; under run.async_rollout with the samples drawn for the next iteration (waited for here), so
    a resumed run trains on the same samples as an uninterrupted one."""
    ahead = None
    if state.ahead is not None:
        samples, probe = state.ahead.result()
        ahead = {"idx": state.ahead.idx, "steps": state.ahead.steps, "samples": asdict(samples),
                 "probe": asdict(probe) if probe is not None else None}
    torch.save({"cursor": asdict(state.cursor), "replay": state.replay.pairs, "iteration": t,
                "pref_cursor": asdict(state.pref_cursor) if state.pref_cursor else None,
                "nonfinite": guard.total, "ahead": ahead, "policy_steps": state.policy_steps}, tmp / "loop.pt")


def load_loop_state(path: Path, t: int) -> tuple[LoopState, dict[str, int]]:
    """The loop state of a checkpoint and its non-finite skip counts. The engines start from the
    checkpoint's policy, so they are never behind after a load."""
    loop = torch.load(path / "loop.pt", weights_only=True)  # our own file, still never code
    ahead = loop.get("ahead")
    if ahead is not None:
        probe = Samples(**ahead["probe"]) if ahead["probe"] is not None else None
        ahead = Ahead(ahead["idx"], (Samples(**ahead["samples"]), probe), ahead["steps"])
    return (LoopState(cursor=DataCursor(**loop["cursor"]), replay=PairReplay([tuple(p) for p in loop["replay"]]),
                      iteration=t, pref_cursor=DataCursor(**loop["pref_cursor"]) if loop.get("pref_cursor") else None,
                      ahead=ahead, policy_steps=loop.get("policy_steps", 0)),
            loop.get("nonfinite", {}))


class IRL:
    """The IRL loop as a runtime recipe. ``learn_reward=False`` keeps r_phi fixed (the RL stage of
    Inverse-RLignment on its discriminator reward); ``paths`` overrides the initial models per role."""

    def __init__(self, cfg: Config, rd: RunDir, echo=print, learn_reward: bool = True,
                 paths: dict[str, str] | None = None, report=None):
        from afd_ray.models.loading import load_tokenizer, resolve_model_path
        from afd_ray.rewards import RuleRewards, fixed_reward_input

        rlhf = cfg.run.method == "rlhf"
        learn_reward = learn_reward and not rlhf
        self.cfg, self.rd, self.echo, self.learn_reward, self.report = cfg, rd, echo, learn_reward, report
        self.initial = resolve_model_path(cfg.model.policy)
        self.tokenizer = load_tokenizer(self.initial)
        self.train, self.heldout = build_data(cfg, self.tokenizer)
        self.prefs = None
        if cfg.run.method == "aihf":  # in the reward step, and held out
            self.prefs = PreferenceData(*build_preferences(cfg, self.tokenizer))
        elif cfg.data.preferences and cfg.run.method == "irl":  # held out only: the reward model's accuracy
            self.prefs = PreferenceData([], build_preferences(cfg, self.tokenizer)[1])
        reward = resolve_model_path(cfg.model.reward) if cfg.model.reward else self.initial
        reference = resolve_model_path(cfg.model.reference) if cfg.model.reference else self.initial
        self.paths = {"rollout": self.initial, "policy": self.initial, "reward": reward, "reference": reference}
        self.roles = ROLES
        if rlhf and not cfg.model.reward:  # a served reward model, or the rule rewards alone: no reward actor
            self.roles = tuple(r for r in ROLES if r != "reward")
        elif rlhf:
            check_reward_model(reward)
        messages = prompt_messages(self.train, self.heldout)  # for models that read another input than the policy
        # a fixed reward model with another tokenizer or template reads each (x, y) re-rendered from the text
        self.reward_input = fixed_reward_input(cfg, self.tokenizer, messages) \
            if rlhf and (cfg.model.reward or cfg.reward.url) else None
        self.rules = RuleRewards.from_config(cfg, self.tokenizer)
        if cfg.critic.enabled:
            self.roles = ROLES + ("critic",)
            self.paths["critic"] = resolve_model_path(cfg.critic.model) if cfg.critic.model else reward
        self.paths |= paths or {}
        # seeds/002 and seeds/004 run the loop from pi_SFT, with pi_ref = pi_SFT: model.sft, or (empty) trained
        # first on the same demonstrations; model.sft=none starts from model.policy as given
        self.sft = None
        if cfg.run.method in ("irl", "aihf") and cfg.model.sft != "none":
            self.sft = resolve_model_path(cfg.model.sft) if cfg.model.sft else ""
        # the learners that are checkpointed (a fixed reward model is not)
        self.learners = [r for r in LEARNERS if r in self.roles and (r != "reward" or learn_reward)]
        self.golden = load_golden(cfg.run.golden_reward, self.tokenizer, cfg.run.golden_format, messages)
        self.guard = NonFiniteGuard(cfg.run.max_nonfinite)
        self.system = None
        self.state = None
        self.c = None
        self.metrics: dict[str, float] = {}

    def start(self, last: Checkpoint | None) -> None:
        from afd_ray.rewards import RerenderedReward, ServedRewardModel

        ensure_ray()
        paths = self.starting_paths(last)
        if last is not None:
            self.state, skips = load_loop_state(last.path, last.iteration)
        else:
            self.state = LoopState(cursor=DataCursor(len(self.train), seed=self.cfg.run.seed),
                                   pref_cursor=DataCursor(len(self.prefs.train), seed=self.cfg.run.seed + 1)
                                   if self.prefs and self.prefs.train else None)
            skips = {}
        self.guard = NonFiniteGuard(self.cfg.run.max_nonfinite, skips)  # counts as of the checkpoint
        self.system = System(self.cfg, paths, self.tokenizer, self.heldout[:4], roles=self.roles,
                             reward_tokenizer=self.reward_input.target if self.reward_input else None,
                             fixed_reward=not self.learn_reward)
        if last is not None:
            for role in self.learners:
                self.system.handles[role].load(str(last.path / f"{role}_state"))
        self.system.sync.check()  # the engines start from the same weights as the learner: prove it
        reward = ServedRewardModel(self.cfg.reward.url, self.cfg.reward.served_model) if self.cfg.reward.url \
            else self.system.handles.get("reward")
        if self.reward_input is not None:
            reward = RerenderedReward(reward, self.reward_input)
        self.c = Collaborators.of(self.system, self.golden, self.rules, reward=reward)
        if self.sft is not None and last is None and self.heldout:
            self.sample_sft()

    def starting_paths(self, last: Checkpoint | None) -> dict[str, str]:
        """The model each role loads: pi_SFT where the run starts from it (``from_sft``), then the learners
        of the last checkpoint; the reference stays pi_ref."""
        if self.sft == "" and last is not None and not (self.rd.path / "sft" / "state.json").is_file():
            # a run begun before the loop started from pi_SFT by default: it goes on as it began
            log.warning("%s has checkpoints but no pi_SFT of its own: it continues from model.policy as it began "
                        "(model.sft=none)", self.rd.path)
            self.sft = None
        if self.sft is not None:
            self.paths = self.from_sft(self.paths)
        paths = dict(self.paths)
        if last is not None:
            paths |= {r: str(last.path / r) for r in self.learners}
            paths["rollout"] = paths["policy"]
        return paths

    def from_sft(self, paths: dict[str, str]) -> dict[str, str]:
        """``paths`` with pi_SFT for every role that starts from the initial policy (rollout, policy, and the
        reward backbone and reference unless given); pi_SFT trained first when not given (a finished SFT
        job of this run is reused: resume and recovery train it once)."""
        if not self.sft:
            from afd_ray.sft import train_sft

            self.echo(f"pi_SFT first: SFT on the {len(self.train)} demonstrations (model.sft=none skips it)")
            self.sft = str(train_sft(self.cfg, self.train, self.rd.path / "sft", self.initial, heldout=self.heldout,
                                     echo=self.echo))
        return {r: self.sft if p == self.initial else p for r, p in paths.items()}

    def sample_sft(self) -> None:
        """pi_SFT's responses to the held-out prompts, drawn once before the first policy step and kept in
        ``sft_heldout.json``: the report scores them with the final reward model (and golden reward) beside
        the final policy's."""
        from afd_ray.runtime.files import atomic_write

        # with the final evaluation's seed: the two samples differ by the policy alone
        atomic_write(self.rd.path / "sft_heldout.json", json.dumps(heldout_sample(self.cfg, self.heldout, self.c)))

    def iteration(self, t: int) -> dict[str, float]:
        probe = self.heldout[: self.cfg.data.probe] if self.cfg.data.probe else self.heldout
        self.metrics = irl_iteration(t, self.cfg, self.train, probe, self.c, self.state,
                                     learn_reward=self.learn_reward, prefs=self.prefs, guard=self.guard)
        return self.metrics

    def save(self, tmp: Path) -> dict[str, dict[int, dict[str, int]]]:
        written = {role: self.system.handles[role].save(str(tmp / f"{role}_state"), str(tmp / role), self.initial)
                   for role in self.learners}
        for role in self.learners:
            write_model_card(tmp / role, self.cfg, role, self.paths[role], self.metrics, self.state.iteration,
                             self.rd.path.name)
        save_loop_state(tmp, self.state, self.state.iteration, self.guard)
        return written

    def finish(self) -> None:
        """The final policy's held-out responses (``final_heldout.json``, pi_SFT's seed) and their diagnostics;
        pi_SFT's beside them under the same final reward model and golden reward, with the golden reward's
        standard errors and the final policy's per-prompt golden win rate against pi_SFT."""
        from afd_ray.eval.golden import mean_se, win_rate
        from afd_ray.runtime.files import atomic_write

        final = {}
        if self.heldout:
            prompts = [d.prompt_ids for d in self.heldout]
            responses = heldout_sample(self.cfg, self.heldout, self.c)
            atomic_write(self.rd.path / "final_heldout.json", json.dumps(responses))
            g_final = self.golden(prompts, responses) if self.golden is not None else None
            final = {f"final/{k.split('/', 1)[1]}": v
                     for k, v in heldout_diagnostics(self.heldout, responses, self.c, golden=g_final).items()}
            kept = self.rd.path / "sft_heldout.json"
            if kept.is_file():  # pi_SFT's held-out responses under the same final reward model and golden reward
                sft = json.loads(kept.read_text())
                g_sft = self.golden(prompts, sft) if self.golden is not None else None
                scored = heldout_diagnostics(self.heldout, sft, self.c, golden=g_sft)
                final |= {f"pi_sft/{k.split('/', 1)[1]}": v for k, v in scored.items()}
                if self.golden is not None:
                    final["final/heldout_policy_se"], final["pi_sft/heldout_policy_se"] = (
                        mean_se(g_final)[1], mean_se(g_sft)[1])
                    final["final/golden_win_rate_vs_pi_sft"], final["final/golden_win_rate_vs_pi_sft_se"] = (
                        win_rate(g_final, g_sft))
        (self.report or write_report)(self.rd, self.cfg, final)
        self.echo(f"done: {self.rd.path} ({self.rd.path / 'report.md'})")


def check_reward_model(path: str) -> None:
    """run.method=rlhf: ``model.reward`` must be a trained reward model (``*ForSequenceClassification`` with
    one label)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"model.reward={path}: run.method=rlhf needs a trained reward model "
                         f"(*ForSequenceClassification, one label), this is {archs or 'unknown'} with "
                         f"{getattr(config, 'num_labels', '?')} labels")


def run(cfg: Config, rd: RunDir, echo=print) -> RunDir:
    if not drive(rd, cfg, IRL(cfg, rd, echo), echo):
        echo(f"stopped after iteration {rd.latest().iteration}; continue with --resume {rd.path}")
    return rd


def write_report(rd: RunDir, cfg: Config, final: dict) -> None:
    """report.md: the per-iteration table, phase times, the final policy on held-out prompts and, for a
    loop from pi_SFT, pi_SFT beside it under the same final reward model and golden reward."""
    from afd_ray.eval.report import metrics_table, phase_times
    from afd_ray.eval.report import write_report as write

    ms = rd.metrics()
    columns = [("rollout/reward", "reward"), ("rollout/kl", "KL"), ("heldout/reward_accuracy", "held-out acc"),
               ("heldout/reward_gap", "reward gap"), ("heldout/preference_accuracy", "pref. acc"),
               ("golden/heldout_policy", "golden (held-out)"), ("golden/heldout_win_rate_vs_demos", "win vs demos"),
               ("time/iteration", "iteration s")]
    sections = [("Per iteration", metrics_table(ms, columns)),
                ("Time per phase (mean seconds per iteration)", phase_times(ms))]
    versus = sorted(k.split("/", 1)[1] for k in final if k.startswith("pi_sft/") and "final/" + k[7:] in final)
    if versus:
        sections.append(("pi_SFT and the final policy on held-out prompts (the final reward model)",
                         ["| | pi_SFT | final policy |", "|---|---|---|"]
                         + [f"| {k} | {final['pi_sft/' + k]:.4f} | {final['final/' + k]:.4f} |" for k in versus]))
    rest = {k: v for k, v in final.items() if not k.startswith("pi_sft/")}
    if rest:
        sections.append(("Final policy on held-out prompts", [f"- {k}: {v:.4f}" for k, v in sorted(rest.items())]))
    write(rd.path, f"Run report: {rd.path.name}", sections,
          intro=f"method `{cfg.run.method}`, policy algo `{cfg.policy.algo}`, model `{cfg.model.policy}`, "
                f"demonstrations `{cfg.data.demonstrations}`, {len(ms)} iterations.")
