"""One IRL run end to end: data, actors, the loop, checkpoints every iteration, resume, report.

Run directory layout:
    config.yaml             the resolved config
    metrics.jsonl           one line per finished iteration
    tensorboard/            the same metrics as TensorBoard events (afd_ray.telemetry; also Ray gauges)
    checkpoints/iter_NNNNNN/{policy, reward}             HF-format models
                           {policy_state, reward_state}  DeepSpeed states (weights, optimizer, RNG)
                           loop.pt                       data cursor, pair replay, iteration
    checkpoints/latest.json the last complete iteration (written last, atomically)
    report.md               summary with the phase-time split
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from afd_ray import toy
from afd_ray.config import Config, ConfigError, load_config
from afd_ray.data.tokenize import Encoded, TruncationRules, encode_demonstrations
from afd_ray.driver import Collaborators, LoopState, PreferenceData, evaluate_policy, irl_iteration
from afd_ray.eval.golden import load_golden
from afd_ray.replay import DataCursor, PairReplay

log = logging.getLogger("afd_ray")


# ---- run directory ---------------------------------------------------------------------------------------

class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self._telemetry = None
        self._purge_after: int | None = None

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        name = cfg.run.name or f"{cfg.run.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        rd = cls(Path(cfg.run.output_dir) / name)
        rd.ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write(rd.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return rd

    def latest(self) -> tuple[int, Path] | None:
        f = self.ckpt / "latest.json"
        if not f.is_file():
            return None
        t = json.loads(f.read_text())["iteration"]
        return t, self.ckpt / f"iter_{t:06d}"

    def begin(self, t: int) -> Path:
        tmp = self.ckpt / f".iter_{t:06d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, t: int, tmp: Path, keep: int) -> Path:
        """Make the partial checkpoint the latest one: rename, then point latest.json at it."""
        final = self.ckpt / f"iter_{t:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(self.ckpt / "latest.json", json.dumps({"iteration": t}))
        done = sorted(p for p in self.ckpt.glob("iter_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def append_metrics(self, m: dict) -> None:
        """One line of metrics.jsonl (fsynced), then the same numbers to TensorBoard and Ray gauges."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._telemetry is None:
            from afd_ray.telemetry import Telemetry

            self._telemetry = Telemetry(self.path, self.path.name, purge_after=self._purge_after)
        self._telemetry.log(m, int(m.get("iteration", m.get("step", 0))))

    def close(self) -> None:
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None

    def metrics(self) -> list[dict]:
        f = self.path / "metrics.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    def truncate_metrics(self, last_iteration: int) -> None:
        """Drop lines of iterations after the last complete checkpoint (they will be run again)."""
        kept = [m for m in self.metrics() if m["iteration"] <= last_iteration]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        self._purge_after = last_iteration  # TensorBoard drops its events after this step too


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- data ------------------------------------------------------------------------------------------------

def build_data(cfg: Config, tokenizer) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenised demonstrations, shuffled with the run seed, split into (train, held-out)."""
    if cfg.data.demonstrations in toy.SOURCES:
        encoded = toy.make_demonstrations(tokenizer, cfg.data.limit or 1024, seed=cfg.run.seed,
                                          eos=toy.SOURCES[cfg.data.demonstrations])
    else:
        from afd_ray.data.readers import load_demonstrations

        loaded = load_demonstrations(cfg.data.demonstrations, cfg.data.split or None, cfg.data.on_bad_row,
                                     cfg.data.limit or None)
        rules = TruncationRules(cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, cfg.data.prompt_overflow,
                                cfg.data.response_overflow, cfg.data.on_bad_row)
        encoded, skipped = encode_demonstrations(tokenizer, loaded.items, rules)
        if loaded.num_skipped or skipped:
            log.warning("demonstrations: skipped %s while reading and %s while tokenising", loaded.skipped, skipped)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    encoded = [encoded[i] for i in order]
    if len(encoded) <= cfg.data.heldout:
        raise ValueError(f"data.heldout={cfg.data.heldout} leaves no training demonstrations out of {len(encoded)}")
    return encoded[cfg.data.heldout:], encoded[: cfg.data.heldout]


# ---- actors ----------------------------------------------------------------------------------------------

ROLES = ("rollout", "policy", "reward", "reference")  # and "critic" for ppo with a critic


class System:
    """The actors of one run and the driver's collaborators over them.

    ``roles`` picks which groups exist (a Best-of-N run has no policy learner, DPO has no rollout); the
    weight sync exists when both the policy learner and the rollout engines do. ``paths`` maps each role
    to the model it loads (the reward role: a causal LM backbone or a saved reward model)."""

    def __init__(self, cfg: Config, paths: dict[str, str], tokenizer, probe: list[Encoded],
                 roles: tuple[str, ...] = ROLES):
        from afd_ray.placement import plan
        from afd_ray.types import SequenceBatch
        from afd_ray.workers import handles
        from afd_ray.workers.deepspeed_rank import LearnerSpec
        from afd_ray.workers.group import ActorGroup, reserve
        from afd_ray.workers.policy import PolicyLearner
        from afd_ray.workers.reference import ReferenceServer
        from afd_ray.workers.reward import RewardLearner
        from afd_ray.workers.rollout import RolloutWorker

        p = plan(cfg, roles)
        self.groups = reserve(p)
        self.actor_groups: list = []
        self.handles: dict = {}
        self.sync = None
        cpu = cfg.run.device == "cpu"
        cores = os.cpu_count() or 2
        pad = tokenizer.pad_token_id
        learner_env = {"OMP_NUM_THREADS": str(max(1, cores // cfg.policy.world_size))} if cpu else None
        max_len = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_response_tokens) + 8
        common = dict(dtype=cfg.model.dtype, lora_r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                      seed=cfg.run.seed, device=cfg.run.device, pad_token_id=pad)
        self.rollout = self.policy = self.reward = self.reference = self.critic = None
        if "rollout" in roles:
            self.rollout = ActorGroup(
                RolloutWorker, p, "rollout", self.groups, paths["rollout"], dtype=cfg.model.dtype,
                max_model_len=max_len, seed=cfg.run.seed, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                enforce_eager=cfg.rollout.enforce_eager, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                device=cfg.run.device, omp_threads_bind=f"0-{cores - 1}" if cpu else "auto",
                kv_cache_gb=cfg.rollout.kv_cache_gb, sleep_mode=cfg.run.colocate)
            self.handles["rollout"] = handles.RolloutPool(self.rollout, sleep_between=cfg.run.colocate)
        if "policy" in roles:
            self.policy = ActorGroup(PolicyLearner, p, "policy", self.groups, LearnerSpec(
                paths["policy"], lr=cfg.policy.lr, warmup_steps=cfg.policy.warmup_steps,
                weight_decay=cfg.policy.weight_decay,
                grad_clip=cfg.policy.grad_clip, zero_stage=cfg.policy.zero_stage,
                micro_batch_size=cfg.policy.micro_batch_size, **common), ranked=True, env=learner_env)
            self.handles["policy"] = handles.PolicyGroup(self.policy)
        if "reward" in roles:
            self.reward = ActorGroup(RewardLearner, p, "reward", self.groups, LearnerSpec(
                paths["reward"], lr=cfg.reward.lr, grad_clip=cfg.reward.grad_clip, zero_stage=cfg.reward.zero_stage,
                micro_batch_size=cfg.reward.micro_batch_size, freeze_layers=cfg.reward.freeze_layers, **common),
                ranked=True, env=learner_env)
            self.handles["reward"] = handles.RewardGroup(self.reward)
        if "reference" in roles:
            self.reference = ActorGroup(ReferenceServer, p, "reference", self.groups, paths["reference"],
                                        dtype=cfg.model.dtype, micro_batch_size=cfg.policy.micro_batch_size,
                                        pad_token_id=pad, device=cfg.run.device)
            self.handles["reference"] = handles.Reference(self.reference)
        if "critic" in roles:
            from afd_ray.workers.critic import CriticLearner

            self.critic = ActorGroup(CriticLearner, p, "critic", self.groups, LearnerSpec(
                paths["critic"], lr=cfg.critic.lr, grad_clip=cfg.policy.grad_clip, zero_stage=cfg.critic.zero_stage,
                micro_batch_size=cfg.critic.micro_batch_size, freeze_layers=cfg.reward.freeze_layers, **common),
                ranked=True, env=learner_env)
            self.handles["critic"] = handles.CriticGroup(self.critic)
        self.actor_groups = [g for g in (self.rollout, self.policy, self.reward, self.reference, self.critic)
                             if g is not None]
        if self.policy is not None and self.rollout is not None:
            probe_batch = SequenceBatch([e.prompt_ids for e in probe], [e.response_ids for e in probe])
            self.sync = handles.WeightSync(self.policy, self.rollout, probe_batch, cfg.run.sync_check_tol,
                                           backend="gloo" if cpu else "nccl", pool=self.handles["rollout"])

    def collaborators(self, golden) -> Collaborators:
        h = self.handles
        return Collaborators(rollout=h.get("rollout"), policy=h.get("policy"), reward=h.get("reward"),
                             reference=h.get("reference"), sync=self.sync.sync if self.sync else None,
                             golden=golden, critic=h.get("critic"))

    def shutdown(self) -> None:
        import ray

        for g in self.actor_groups:
            g.kill()
        for pg in self.groups.values():
            ray.util.remove_placement_group(pg)


def local_ray_env() -> int | None:
    """Settings for a Ray instance this process starts, made before ``ray.init`` so every Ray process
    inherits them; returns the dashboard port to start (None under a given cluster address).

    Ray Train collects worker reports every 0.2 s instead of 2 s (a report per SFT step otherwise costs
    2 s). Ray Train's placement-group cleaner finds the state API through RAY_API_SERVER_ADDRESS, else by
    discovering "the" local cluster, which on a machine running another Ray instance can be the wrong one
    (it then removes this job's placement groups): pin it to this instance's dashboard port."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if os.environ.get("RAY_ADDRESS"):
        return None
    from afd_ray.workers.group import free_port

    with socket.socket() as s:
        port = 8265 if s.connect_ex(("127.0.0.1", 8265)) != 0 else free_port()
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    return port


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        port = local_ray_env()
        # Under `ray job submit` RAY_ADDRESS points at the cluster; plain `python` starts a local instance.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                 **({"dashboard_port": port} if port else {}))


def run(cfg: Config | None = None, resume: str | Path | None = None, echo=print) -> RunDir:
    """Start a run from ``cfg`` or resume ``resume`` (a run directory) after its last complete iteration."""
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    if resume is not None:
        rd = RunDir(resume)
        if not (rd.path / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a run directory (no config.yaml)")
        saved = load_config(str(rd.path / "config.yaml"))
        if cfg is not None:  # allow a longer schedule or a different stop point on resume
            saved.run.iterations, saved.run.stop_after = cfg.run.iterations, cfg.run.stop_after
        cfg = saved
        from afd_ray.methods import baselines

        if cfg.run.method in baselines.RESUMABLE:
            return baselines.run(cfg, echo, rd=rd)
        if cfg.run.method not in ("irl", "aihf"):
            raise ConfigError(f"--resume continues irl, aihf, {', '.join(baselines.RESUMABLE)} runs; {rd.path} is a "
                              f"{cfg.run.method} run (an SFT job resumes when run again with the same run.name)")
    elif cfg.run.method not in ("irl", "aihf"):
        return run_method(cfg, echo)
    else:
        rd = RunDir.create(cfg)
    initial = resolve_model_path(cfg.model.policy)
    tokenizer = load_tokenizer(initial)
    train, heldout = build_data(cfg, tokenizer)
    prefs = None
    if cfg.run.method == "aihf":
        from afd_ray.methods.baselines import build_preferences

        prefs = PreferenceData(*build_preferences(cfg, tokenizer))
    state = LoopState(cursor=DataCursor(len(train), seed=cfg.run.seed),
                      pref_cursor=DataCursor(len(prefs.train), seed=cfg.run.seed + 1) if prefs else None)
    policy_path, reward_path = initial, resolve_model_path(cfg.model.reward) if cfg.model.reward else initial
    last = rd.latest()
    if last is not None:
        t, path = last
        loop = torch.load(path / "loop.pt", weights_only=False)
        state = LoopState(cursor=DataCursor(**loop["cursor"]), replay=PairReplay(loop["replay"]), iteration=t,
                          pref_cursor=DataCursor(**loop["pref_cursor"]) if loop.get("pref_cursor") else None)
        policy_path, reward_path = str(path / "policy"), str(path / "reward")
        echo(f"resuming {rd.path} after iteration {t}")
    rd.truncate_metrics(last[0] if last else 0)  # iterations after the last checkpoint run again
    reference_path = resolve_model_path(cfg.model.reference) if cfg.model.reference else initial
    paths = {"rollout": policy_path, "policy": policy_path, "reward": reward_path, "reference": reference_path}
    roles = ROLES
    if cfg.critic.enabled:
        roles = ROLES + ("critic",)
        paths["critic"] = (str(last[1] / "critic") if last is not None else
                           resolve_model_path(cfg.critic.model) if cfg.critic.model else reward_path)
    ensure_ray()
    system = System(cfg, paths, tokenizer, heldout[:4], roles=roles)
    try:
        if last is not None:
            import ray

            ray.get(system.policy.run("load", str(last[1] / "policy_state"))
                    + system.reward.run("load", str(last[1] / "reward_state"))
                    + (system.critic.run("load", str(last[1] / "critic_state")) if system.critic else []))
        system.sync.check()  # the engines start from the same weights as the learner: prove it
        c = system.collaborators(load_golden(cfg.run.golden_reward, tokenizer))
        end = cfg.run.iterations if not cfg.run.stop_after else min(cfg.run.iterations,
                                                                      state.iteration + cfg.run.stop_after)
        for t in range(state.iteration + 1, end + 1):
            m = irl_iteration(t, cfg, train, heldout, c, state, prefs=prefs)
            if t % cfg.run.checkpoint_every == 0 or t == end:
                t0 = time.perf_counter()
                save_checkpoint(rd, system, state, t, initial, cfg.run.keep_checkpoints)
                m["time/checkpoint"] = time.perf_counter() - t0
            rd.append_metrics(m)
            echo(summary_line(m))
        if state.iteration == cfg.run.iterations:
            final = evaluate_policy(cfg, heldout, c) if heldout else {}
            write_report(rd, cfg, final)
            echo(f"done: {rd.path} ({rd.path / 'report.md'})")
        else:
            echo(f"stopped after iteration {state.iteration}; continue with --resume {rd.path}")
    finally:
        system.shutdown()
        rd.close()
    return rd


def run_method(cfg: Config, echo=print) -> RunDir:
    """The recipes besides the bi-level loop (afd_ray.methods, afd_ray.sft)."""
    if cfg.run.method == "inverse_rlignment":
        from afd_ray.methods import irlignment

        return irlignment.run(cfg, echo)
    if cfg.run.method == "sft":
        from afd_ray import sft

        return sft.run(cfg, echo)
    from afd_ray.methods import baselines

    return baselines.run(cfg, echo)


def save_checkpoint(rd: RunDir, system: System, state: LoopState, t: int, tokenizer_path: str, keep: int) -> None:
    tmp = rd.begin(t)
    system.handles["policy"].save(str(tmp / "policy_state"), str(tmp / "policy"), tokenizer_path)
    system.handles["reward"].save(str(tmp / "reward_state"), str(tmp / "reward"), tokenizer_path)
    if "critic" in system.handles:
        system.handles["critic"].save(str(tmp / "critic_state"), str(tmp / "critic"), tokenizer_path)
    torch.save({"cursor": asdict(state.cursor), "replay": state.replay.pairs, "iteration": t,
                "pref_cursor": asdict(state.pref_cursor) if state.pref_cursor else None}, tmp / "loop.pt")
    rd.commit(t, tmp, keep)


def summary_line(m: dict) -> str:
    keys = [("iteration", "it", "{:.0f}"), ("rollout/reward", "r", "{:+.3f}"), ("rollout/kl", "kl", "{:.3f}"),
            ("heldout/reward_accuracy", "acc", "{:.2f}"), ("golden/heldout_policy", "golden", "{:.3f}"),
            ("sync/sync_seconds", "sync", "{:.2f}s"), ("time/iteration", "time", "{:.1f}s")]
    return "  ".join(f"{short}={fmt.format(m[k])}" for k, short, fmt in keys if k in m)


def write_report(rd: RunDir, cfg: Config, final: dict) -> None:
    ms = rd.metrics()
    phases = sorted({k for m in ms for k in m if k.startswith("time/") and k != "time/iteration"})
    lines = [f"# Run report: {rd.path.name}", "",
             f"method `{cfg.run.method}`, policy algo `{cfg.policy.algo}`, model `{cfg.model.policy}`, "
             f"demonstrations `{cfg.data.demonstrations}`, {len(ms)} iterations.", "",
             "## Per iteration", "",
             "| it | reward | KL | held-out acc | reward gap | golden (held-out) | iteration s |",
             "|---|---|---|---|---|---|---|"]
    for m in ms:
        lines.append("| {:.0f} | {:+.3f} | {:.3f} | {} | {} | {} | {:.1f} |".format(
            m["iteration"], m.get("rollout/reward", float("nan")), m.get("rollout/kl", float("nan")),
            _fmt(m.get("heldout/reward_accuracy")), _fmt(m.get("heldout/reward_gap")),
            _fmt(m.get("golden/heldout_policy")), m.get("time/iteration", float("nan"))))
    lines += ["", "## Time per phase (mean seconds per iteration)", ""]
    for k in phases:
        lines.append(f"- {k.removeprefix('time/')}: {sum(m.get(k, 0) for m in ms) / max(len(ms), 1):.1f}")
    if final:
        lines += ["", "## Final policy on held-out prompts", ""] + [f"- {k}: {v:.4f}" for k, v in sorted(final.items())]
    atomic_write(rd.path / "report.md", "\n".join(lines) + "\n")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
