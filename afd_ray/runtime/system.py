"""The actors of one run (``System``) and the Ray instance they live in (``ensure_ray``)."""

from __future__ import annotations

import os
import socket

from afd_ray.config import Config
from afd_ray.data.tokenize import Encoded
from afd_ray.types import SamplingSpec

ROLES = ("rollout", "policy", "reward", "reference")  # and "critic" for ppo with a critic

# how long actors may take to start (model load, vLLM engine start: 17-27 s on 2 cores, minutes for 7B on GPU)
START_TIMEOUT_S = 1800.0


class System:
    """The actors of one run and the driver's collaborators over them.

    ``roles`` picks which groups exist (a Best-of-N run has no policy learner, DPO has no rollout); the
    weight sync exists when both the policy learner and the rollout engines do. ``paths`` maps each role
    to the model it loads (the reward role: a causal LM backbone or a saved reward model; ``reward_tokenizer``:
    its own when it reads another vocabulary than the policy, for its padding; ``fixed_reward``: the reward
    model is only scored, by ``RewardServer`` replicas without optimizer state). Every call on
    the groups has the deadline ``run.call_timeout_s``; construction waits until every actor is up."""

    def __init__(self, cfg: Config, paths: dict[str, str], tokenizer, probe: list[Encoded],
                 roles: tuple[str, ...] = ROLES, reward_tokenizer=None, fixed_reward: bool = False):
        from afd_ray.placement import plan, sync_backend
        from afd_ray.types import SequenceBatch
        from afd_ray.workers import handles
        from afd_ray.workers.deepspeed_rank import LearnerSpec
        from afd_ray.workers.group import ActorGroup, reserve
        from afd_ray.workers.logs import run_log_dir
        from afd_ray.workers.policy import PolicyLearner
        from afd_ray.workers.reference import ReferenceServer
        from afd_ray.workers.reward import RewardLearner, RewardServer
        from afd_ray.workers.rollout import RolloutWorker

        p = plan(cfg, roles)
        self.overlaps = p.overlaps
        self.groups: dict = {}
        self.handles: dict = {}
        self.sync = None
        cpu = cfg.run.device == "cpu"
        cores = os.cpu_count() or 2
        pad = tokenizer.pad_token_id
        max_len = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_response_tokens) + 8
        common = dict(dtype=cfg.model.dtype, lora_r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                      seed=cfg.run.seed, device=cfg.run.device, pad_token_id=pad)
        timeout = cfg.run.call_timeout_s
        backend = sync_backend(cfg)
        # each actor's output to RUN_DIR/logs/<role>-<rank>.log, its warnings and errors to the console
        logs = run_log_dir(cfg)
        # dropping the weights in sleep (level 2) is safe only when a learner re-sends them after each wake
        sleep_level = cfg.rollout.sleep_level if "policy" in roles else 1
        self.rollout = self.policy = self.reward = self.reference = self.critic = None

        def threads(role: str) -> dict[str, str]:
            return {"OMP_NUM_THREADS": str(p.omp_threads(role, cores))}

        def learner(cls, role: str, **spec) -> ActorGroup:
            """A DeepSpeed group of ``role``, with the memory and batching settings of its config section."""
            section = getattr(cfg, role)
            spec.update(zero_stage=section.zero_stage, micro_batch_size=section.micro_batch_size,
                        gradient_checkpointing=section.gradient_checkpointing, offload=section.offload)
            return ActorGroup(cls, p, role, self.groups, LearnerSpec(paths[role], **(common | spec)), ranked=True,
                              env=threads(role), timeout_s=timeout, log_dir=logs)

        try:
            self.groups = reserve(p)
            if "rollout" in roles:
                self.rollout = ActorGroup(
                    RolloutWorker, p, "rollout", self.groups, paths["rollout"], dtype=cfg.model.dtype,
                    max_model_len=max_len, seed=cfg.run.seed,
                    gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                    enforce_eager=cfg.rollout.enforce_eager, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                    device=cfg.run.device, omp_threads_bind=f"0-{cores - 1}" if cpu else "auto",
                    kv_cache_gb=cfg.rollout.kv_cache_gb, sleep_mode=cfg.run.colocate, sync_backend=backend,
                    sleep_level=sleep_level, max_num_batched_tokens=cfg.rollout.max_num_batched_tokens,
                    env=threads("rollout"), timeout_s=timeout, log_dir=logs)
                self.handles["rollout"] = handles.RolloutPool(self.rollout, sleep_between=cfg.run.colocate,
                                                              sleep_level=sleep_level)
            if "policy" in roles:
                self.policy = learner(PolicyLearner, "policy", lr=cfg.policy.lr, warmup_steps=cfg.policy.warmup_steps,
                                      weight_decay=cfg.policy.weight_decay, grad_clip=cfg.policy.grad_clip)
                self.handles["policy"] = handles.PolicyGroup(self.policy)
            reward_pad = reward_tokenizer.pad_token_id if reward_tokenizer else pad
            if "reward" in roles and fixed_reward:
                self.reward = ActorGroup(RewardServer, p, "reward", self.groups, paths["reward"], dtype=cfg.model.dtype,
                                         micro_batch_size=cfg.reward.micro_batch_size, pad_token_id=reward_pad,
                                         device=cfg.run.device, env=threads("reward"), timeout_s=timeout, log_dir=logs)
                self.handles["reward"] = handles.FixedReward(self.reward)
            elif "reward" in roles:
                self.reward = learner(RewardLearner, "reward", lr=cfg.reward.lr, grad_clip=cfg.reward.grad_clip,
                                      freeze_layers=cfg.reward.freeze_layers, pad_token_id=reward_pad)
                self.handles["reward"] = handles.RewardGroup(self.reward)
            if "reference" in roles:
                self.reference = ActorGroup(ReferenceServer, p, "reference", self.groups, paths["reference"],
                                            dtype=cfg.model.dtype, micro_batch_size=cfg.policy.micro_batch_size,
                                            pad_token_id=pad, device=cfg.run.device, env=threads("reference"),
                                            timeout_s=timeout, log_dir=logs)
                self.handles["reference"] = handles.Reference(self.reference)
            if "critic" in roles:
                from afd_ray.workers.critic import CriticLearner

                self.critic = learner(CriticLearner, "critic", lr=cfg.critic.lr, grad_clip=cfg.policy.grad_clip,
                                      freeze_layers=cfg.reward.freeze_layers)
                self.handles["critic"] = handles.CriticGroup(self.critic)
            for g in self.actor_groups:
                g.ready(max(START_TIMEOUT_S, timeout) if timeout else None)
            if self.policy is not None and self.rollout is not None:
                probe_batch = SequenceBatch([e.prompt_ids for e in probe], [e.response_ids for e in probe])
                self.sync = handles.WeightSync(self.policy, self.rollout, probe_batch, cfg.run.sync_check_tol,
                                               backend=backend, pool=self.handles["rollout"])
                pool = self.handles["rollout"]  # its engines serve this learner: stale after its updates
                pool.learner, pool.push = self.handles["policy"], self.sync.sync
            if cfg.run.colocate and "rollout" in self.handles:  # the learners give the GPUs to waking engines
                self.handles["rollout"].learners = [self.handles[r] for r in ("policy", "reward", "critic")
                                                    if r in self.handles and not (r == "reward" and fixed_reward)]
        except BaseException:
            self.shutdown()
            raise

    @property
    def actor_groups(self) -> list:
        return [g for g in (self.rollout, self.policy, self.reward, self.reference, self.critic) if g is not None]

    def dead_roles(self) -> list[str]:
        """The roles with a dead actor (after a failed call: was it the actor or the call?)."""
        return [g.role for g in self.actor_groups if g.dead()]

    def shutdown(self) -> None:
        import ray

        for g in self.actor_groups:
            g.kill()
        for pg in self.groups.values():
            ray.util.remove_placement_group(pg)
        self.rollout = self.policy = self.reward = self.reference = self.critic = None
        self.groups = {}


def sample_once(cfg: Config, model_path: str, prompts: list[list[int]], tokenizer, seed: int,
                temperature: float | None = None) -> list[list[int]]:
    """One response per prompt from ``model_path`` with a short-lived rollout engine, sampled as
    ``cfg.rollout`` says (``temperature`` overrides it; 0 = greedy)."""
    system = System(cfg, {"rollout": model_path}, tokenizer, [], roles=("rollout",))
    try:
        return system.handles["rollout"].generate(prompts, once_spec(cfg, seed, temperature)).response_ids
    finally:
        system.shutdown()


def once_spec(cfg: Config, seed: int, temperature: float | None = None) -> SamplingSpec:
    """``sample_once``'s sampling (one response per prompt as ``cfg.rollout`` says), for an engine already up."""
    return SamplingSpec(n=1, temperature=cfg.rollout.temperature if temperature is None else temperature,
                        top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_new_tokens, seed=seed)


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

    from afd_ray.workers import logs

    if not ray.is_initialized():
        port = local_ray_env()
        # Under `ray job submit` RAY_ADDRESS points at the cluster; plain `python` starts a local instance
        # whose dashboard listens on localhost only (the job API runs code: never open it to the network).
        # The setup hook sends an actor's output to its log file when its environment names one (logs.py).
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}, "worker_process_setup_hook": logs.HOOK},
                 **({"dashboard_port": port, "dashboard_host": "127.0.0.1"} if port else {}))
