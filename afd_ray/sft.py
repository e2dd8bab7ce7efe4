"""Supervised fine-tuning as a Ray Train job: TorchTrainer + DeepSpeed ZeRO, checkpoints, fault tolerance.

    pi_SFT = argmin_theta  -E_{(x, y*) ~ D_demo} [ (1/|y*|) sum_t log pi_theta(y*_t | x, y*_<t) ]

(behaviour cloning, the forward-KL view of alignment from demonstrations: seeds/000 Eq. 6-7.) Every recipe
that needs pi_SFT (Inverse-RLignment, SPIN, DPO) trains it here when ``model.sft`` is empty.

Shape of the job: ``sft.num_workers`` Ray Train workers, one DeepSpeed rank each (gloo on CPU, NCCL on
GPU; Ray Train creates the process group, DeepSpeed wraps it). A step takes ``sft.batch_size``
demonstrations: each worker its ``rank::world`` share in micro-batches, gradients accumulated, the loss
a mean over every response token of the whole batch (the denominator is all-reduced). Every
``sft.checkpoint_every`` steps each rank writes its DeepSpeed shard (weights, optimizer, scheduler, data
position) and rank 0 the HF-format model; Ray Train merges them into one checkpoint. A failed worker
restarts the group from the last checkpoint (``sft.max_failures``); running the job again with the same
run directory continues after the last checkpoint. Packing (``sft.packing``) concatenates
demonstrations into rows with a block-diagonal causal mask and per-demonstration positions, so packed
and unpacked losses agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from afd_ray.config import Config
from afd_ray.data.tokenize import Encoded
from afd_ray.progress import bar, follow, put
from afd_ray.workers.logs import actor_env, run_log_dir

log = logging.getLogger("afd_ray")

FAULT_ENV = "AFD_RAY_SFT_FAIL_AT_STEP"  # fault injection for tests: the last rank dies once at this step


@dataclass
class SFTJob:
    """What every worker needs (the demonstrations travel separately, through the object store)."""

    model_path: str
    tokenizer_path: str
    total_steps: int
    batch_size: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    zero_stage: int
    packing: bool
    max_len: int
    loss: str
    checkpoint_every: int
    dtype: str
    lora_r: int
    lora_alpha: int
    seed: int
    pad_token_id: int
    device: str
    marker_dir: str


# ---- batches ---------------------------------------------------------------------------------------------

@dataclass
class PackedBatch:
    """Rows of concatenated sequences. input_ids/position_ids/segment_ids: (B, T); segment 0 is padding;
    loss_mask: (B, T-1) over next-token targets that are response tokens; attention_mask: (B, 1, T, T)
    additive mask (0 where position i may attend to j: same segment, j <= i)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


def pack(seqs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> PackedBatch:
    """First-fit packing of (prompt, response) sequences into rows of at most ``max_len`` tokens."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    lengths: list[int] = []
    for p, r in seqs:
        n = len(p) + len(r)
        if n > max_len:
            raise ValueError(f"a sequence of {n} tokens does not fit sft packing rows of {max_len} tokens")
        for i, used in enumerate(lengths):
            if used + n <= max_len:
                rows[i].append((p, r))
                lengths[i] += n
                break
        else:
            rows.append([(p, r)])
            lengths.append(n)
    T = max(lengths)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)
    target = torch.zeros((B, T), dtype=torch.bool)  # token t is a response token (a target of t - 1)
    for b, row in enumerate(rows):
        at = 0
        for k, (p, r) in enumerate(row, start=1):
            n = len(p) + len(r)
            ids[b, at:at + n] = torch.tensor(p + r)
            pos[b, at:at + n] = torch.arange(n)
            seg[b, at:at + n] = k
            target[b, at + len(p):at + n] = True
            at += n
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] > 0)
    allowed |= torch.eye(T, dtype=torch.bool)  # padding attends to itself (no all-masked rows)
    mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    # the target at t+1 is predicted from t within the same segment
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return PackedBatch(ids, pos, mask, (target[:, 1:] & same).float())


def _forward_logp(engine, batch, packed: bool):
    from afd_ray.models.loading import response_logprobs

    if packed:
        return response_logprobs(engine.module, batch.input_ids, batch.attention_mask.to(engine.module.dtype),
                                 batch.loss_mask, position_ids_BT=batch.position_ids), batch.loss_mask
    mask = batch.shifted_mask.float()
    return response_logprobs(engine.module, batch.input_ids, batch.attention_mask, mask), mask


def _make_batch(seqs, job: SFTJob, device):
    from afd_ray.data.tokenize import collate

    if job.packing:
        b = pack(seqs, job.max_len, job.pad_token_id)
        return PackedBatch(*(t.to(device) for t in (b.input_ids, b.position_ids, b.attention_mask, b.loss_mask)))
    b = collate([p for p, _ in seqs], [r for _, r in seqs], job.pad_token_id)
    return type(b)(b.input_ids.to(device), b.attention_mask.to(device), b.response_mask.to(device))


def step_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Demonstrations of global step ``step``: walks a seeded permutation per epoch (resumable from the
    step number alone)."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[(k * batch_size + i) % n] for i in range(batch_size)]


# ---- the Ray Train worker --------------------------------------------------------------------------------

def train_loop(config: dict) -> None:
    """One Ray Train worker = one DeepSpeed rank."""
    import tempfile

    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    from afd_ray.algo.losses import sft_loss
    from afd_ray.models.loading import LoraSpec, load_policy, load_tokenizer, save_model
    from afd_ray.workers.deepspeed_rank import ds_config

    job = SFTJob(**config["job"])
    tokenizer = load_tokenizer(job.tokenizer_path)  # saved with the model at every checkpoint
    progress = config.get("progress")  # afd_ray.progress.follow's queue: the driver's bar
    data = ray.get(config["data"])
    heldout = ray.get(config["heldout"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.seed)
    lora = LoraSpec(r=job.lora_r, alpha=job.lora_alpha) if job.lora_r else None
    model = load_policy(job.model_path, job.dtype, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    warm = max(job.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    accum = job.batch_size // (job.micro_batch_size * world)
    ds_cfg = ds_config(job.micro_batch_size, world, job.grad_clip, job.zero_stage, job.dtype, accumulation=accum)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    device = engine.device

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(str(Path(d) / "deepspeed"))
            start = client["step"]
            torch.set_rng_state(client["rng"])

    def all_sum(values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def heldout_nll() -> float:
        engine.eval()
        mine = heldout[rank::world]
        total = tokens = 0.0
        with torch.no_grad():
            for i in range(0, max(len(mine), 1), job.micro_batch_size):
                chunk = mine[i:i + job.micro_batch_size] or heldout[:1]
                logp, mask = _forward_logp(engine, _make_batch(chunk, job, device), job.packing)
                if mine[i:i + job.micro_batch_size]:
                    total -= float((logp * mask).sum())
                    tokens += float(mask.sum())
        # every rank ran as many micro-batches as its shard needs: pad the short ones
        count = math.ceil(len(mine) / job.micro_batch_size)
        most = int(_all_max(count, device))
        for _ in range(most - max(count, 1)):
            with torch.no_grad():
                _forward_logp(engine, _make_batch(heldout[:1], job, device), job.packing)
        total, tokens = all_sum([total, tokens])
        engine.train()
        return total / max(tokens, 1)

    fail_at = int(os.environ.get(FAULT_ENV, "0") or 0)
    marker = Path(job.marker_dir) / ".fault_injected"
    engine.train()
    for step in range(start, job.total_steps):
        t0 = time.perf_counter()
        idx = step_indices(len(data), step, job.batch_size, job.seed)[rank::world]
        seqs = [data[i] for i in idx]
        n_tokens, n_seqs = all_sum([sum(len(r) for _, r in seqs), len(seqs)])
        # the loss is a sum over this rank's tokens divided by the global count of what it averages over
        # (tokens, or demonstrations: Protocol 1); DeepSpeed divides by accum and averages ranks: undo both
        denom = (n_tokens if job.loss == "token" else n_seqs) / (world * accum)
        loss_sum = 0.0
        for k in range(accum):
            chunk = seqs[k * job.micro_batch_size:(k + 1) * job.micro_batch_size]
            logp, mask = _forward_logp(engine, _make_batch(chunk, job, device), job.packing)
            loss = sft_loss(logp, mask, job.loss, denom=denom)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        done = step + 1
        if fail_at and done == fail_at and rank == world - 1 and not marker.exists():
            marker.write_text("failed once\n")
            os._exit(1)  # a crashed worker: Ray Train restarts the group from the last checkpoint
        metrics = {"step": done, "loss": all_sum([loss_sum])[0] / (world * accum),  # the batch's mean (sft.loss)
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0), "lr": scheduler.get_last_lr()[0],
                   "tokens": n_tokens, "step_seconds": time.perf_counter() - t0}
        if done % job.checkpoint_every == 0 or done == job.total_steps:
            metrics["heldout_nll"] = heldout_nll() if heldout else float("nan")
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag="state",
                                       client_state={"step": done, "rng": torch.get_rng_state()})
                with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                       enabled=job.zero_stage == 3):
                    if rank == 0:
                        save_model(engine.module, tokenizer, Path(tmp) / "hf")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if rank == 0:
            put(progress, metrics)


def _all_max(value: int, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


# ---- the driver side -------------------------------------------------------------------------------------

def total_steps(cfg: Config, num_demos: int) -> int:
    per_epoch = max(num_demos // cfg.sft.batch_size, 1)
    return cfg.sft.max_steps or cfg.sft.epochs * per_epoch


def train_sft(cfg: Config, demos: list[Encoded], out_dir: str | Path, model_path: str,
              heldout: list[Encoded] | None = None, echo=print) -> Path:
    """Run (or continue) the SFT job; returns the HF folder of pi_SFT (``out_dir/model``).

    Ray Train state lives in ``out_dir/ray_train``: calling this again with the same ``out_dir`` resumes
    after the last checkpoint (a finished job returns at once with its final model)."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from afd_ray.models.loading import load_tokenizer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    final = out / "model"
    steps = total_steps(cfg, len(demos))
    state = out / "state.json"
    if final.is_dir() and state.is_file() and json.loads(state.read_text()).get("steps") == steps:
        return final
    tokenizer = load_tokenizer(model_path)
    job = SFTJob(model_path=model_path, tokenizer_path=model_path, total_steps=steps,
                 batch_size=cfg.sft.batch_size, micro_batch_size=cfg.sft.micro_batch_size, lr=cfg.sft.lr,
                 warmup_steps=cfg.sft.warmup_steps, weight_decay=cfg.sft.weight_decay, grad_clip=cfg.sft.grad_clip,
                 zero_stage=cfg.sft.zero_stage, packing=cfg.sft.packing, loss=cfg.sft.loss,
                 max_len=(cfg.data.max_prompt_tokens + cfg.data.max_response_tokens) * cfg.sft.micro_batch_size,
                 checkpoint_every=cfg.sft.checkpoint_every, dtype=cfg.model.dtype, lora_r=cfg.model.lora_r,
                 lora_alpha=cfg.model.lora_alpha, seed=cfg.run.seed, pad_token_id=tokenizer.pad_token_id,
                 device=cfg.run.device, marker_dir=str(out))
    gpu = cfg.run.device == "gpu"
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not gpu:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // cfg.sft.num_workers))
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    env |= actor_env(run_log_dir(cfg), "sft", None)  # the workers' output to RUN_DIR/logs/sft.log
    t0 = time.perf_counter()
    with follow(bar(steps, "SFT", unit="step")) as progress:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"job": asdict(job), "data": ray.put([(d.prompt_ids, d.response_ids) for d in demos]),
                               "heldout": ray.put([(d.prompt_ids, d.response_ids) for d in heldout or []]),
                               "progress": progress},
            scaling_config=ScalingConfig(num_workers=cfg.sft.num_workers, use_gpu=gpu,
                                         resources_per_worker={"GPU": 1, "CPU": 1} if gpu else {"CPU": 0.5}),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(name="ray_train", storage_path=str(out),
                                 failure_config=FailureConfig(max_failures=cfg.sft.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 worker_runtime_env={"env_vars": env},
                                 # Ray Train's own INFO lines (a "Reporting training result" per step) only
                                 # under run.verbose; warnings always
                                 logging_config=LoggingConfig("INFO" if cfg.run.verbose else "WARNING")))
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the SFT job in {out} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        tmp = out / ".model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(d) / "hf", tmp)
        from afd_ray.runtime.card import write_model_card

        write_model_card(tmp, replace(cfg, run=replace(cfg.run, method="sft")), "policy", model_path,
                         {f"sft/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)}, steps,
                         out.name, unit="step")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    from afd_ray.runtime.files import atomic_write

    atomic_write(state, json.dumps({"steps": steps, "metrics": result.metrics,
                                    "seconds": time.perf_counter() - t0}))
    echo(f"SFT: {steps} steps, final loss {result.metrics.get('loss', float('nan')):.4f}, held-out NLL "
         f"{result.metrics.get('heldout_nll', float('nan')):.4f} -> {final}")
    return final


def run(cfg: Config, rd, echo=print):
    """run.method=sft: pi_SFT from model.policy on the demonstrations, with a report. Its run directory is
    the runtime's (config saved and compared, --resume); Ray Train keeps the step checkpoints in sft/."""
    from afd_ray.data.build import build_data
    from afd_ray.eval.report import write_report
    from afd_ray.models.loading import load_tokenizer, resolve_model_path
    from afd_ray.runtime.system import ensure_ray

    init = resolve_model_path(cfg.model.policy)
    train, heldout = build_data(cfg, load_tokenizer(init))
    ensure_ray()
    path = train_sft(cfg, train, rd.path / "sft", init, heldout=heldout, echo=echo)
    metrics = json.loads((rd.path / "sft" / "state.json").read_text())["metrics"]
    write_report(rd.path, f"SFT: {rd.path.name}", [("Final step", [
        f"- {k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float)])],
        intro=f"model `{cfg.model.policy}` -> `{path}`, demonstrations `{cfg.data.demonstrations}` ({len(train)} "
              f"train, {len(heldout)} held-out), {cfg.sft.num_workers} Ray Train workers, ZeRO-{cfg.sft.zero_stage}.")
    echo(f"done: {rd.path} ({rd.path / 'report.md'})")
    return rd
