"""The DeepSpeed rank shared by the policy learner and the reward learner (one Ray actor per rank).

Each rank holds a DeepSpeed ZeRO-2/3 engine (gloo on CPU, NCCL on GPU) and takes its shard
(``rank::world_size``) of every batch the driver hands the group. Losses are normalised by the *global*
token (or pair) count, so the gradient DeepSpeed averages over ranks is exactly the single-process
gradient of the whole batch (tests/test_system.py checks this against ``afd_ray.algo``). Every rank runs
the same number of micro-batches (short ranks run a zero-weight one) because ZeRO's collectives must match.

Memory for large models: gradient checkpointing (``LearnerSpec.gradient_checkpointing``), ZeRO offload of the
optimizer (and, under ZeRO-3, the parameters) to CPU memory (``LearnerSpec.offload``), and, for a learner that
shares its GPU with vLLM engines, ``offload_states`` / ``reload_states`` around the engines' awake time.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from afd_ray.data.tokenize import TokenBatch, collate
from afd_ray.types import SequenceBatch

log = logging.getLogger("afd_ray")

OFFLOAD = ("none", "optimizer", "all")

@dataclass
class LearnerSpec:
    """What one learner group trains; the same for every rank of the group."""

    model_path: str
    dtype: str = "float32"
    lr: float = 1e-6
    warmup_steps: int = 0  # linear learning-rate warm-up over the first optimizer steps; 0 = constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 2
    micro_batch_size: int = 4
    lora_r: int = 0
    lora_alpha: int = 16
    freeze_layers: int = 0
    seed: int = 0
    device: str = "cpu"
    pad_token_id: int = 0
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory, ~1 more forward)
    offload: str = "none"  # ZeRO offload to CPU memory: "none", "optimizer" (+ fp32 master weights), "all" (+ params)


def ds_config(micro_batch_size: int, world_size: int, grad_clip: float, zero_stage: int, dtype: str,
              offload: str = "none", accumulation: int = 1) -> dict:
    """The DeepSpeed config of a learner rank and of an SFT worker.

    ``offload``: "optimizer" keeps the fp32 master weights and the Adam moments in pinned CPU memory and steps
    them there (ZeRO-Offload; the GPU holds the 16-bit weights and gradients); "all" also keeps the parameters
    there (ZeRO-Infinity's CPU tier: ZeRO-3 only, as only ZeRO-3 partitions parameters). Either way
    DeepSpeed's CPU Adam is used when its op builds, else the torch AdamW the rank passes
    (``zero_force_ds_cpu_optimizer`` off lets DeepSpeed accept it)."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload={offload!r} is not one of {list(OFFLOAD)}")
    if offload == "all" and zero_stage != 3:
        raise ValueError(f"offload='all' offloads the parameters, which needs ZeRO-3 (zero_stage=3), got "
                         f"zero_stage={zero_stage}")
    zero = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size * accumulation,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def adamw(params: list, lr: float, weight_decay: float, offload: str = "none") -> torch.optim.Optimizer:
    """AdamW over ``params``. With ZeRO offload the optimizer steps CPU tensors: DeepSpeed's vectorised CPU
    Adam (the same AdamW update) when its C++ op compiles (once per machine, into the torch extensions
    cache), else torch AdamW, slower on large models, with a warning."""
    if offload != "none":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        except Exception as e:  # noqa: BLE001 - a failed op build raises many kinds (no compiler, no headers)
            log.warning("DeepSpeedCPUAdam is unavailable (%s: %s); the offloaded optimizer steps with torch AdamW",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class DeepSpeedRank:
    """One DeepSpeed rank: engine set-up, sharding, micro-batching, the optimizer step, checkpoints.
    The role classes (``PolicyLearner``, ``RewardLearner``) add their verbs."""

    KIND = "policy"  # which model the rank loads: "policy" (causal LM) or "reward" (backbone + scalar head)

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0" if spec.device == "cpu"
                          else os.environ.get("LOCAL_RANK", "0"), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        import deepspeed

        from afd_ray.models.loading import (
            LoraSpec,
            enable_gradient_checkpointing,
            load_policy,
            load_reward_model,
        )

        self.spec, self.rank, self.world_size = spec, rank, world_size
        torch.manual_seed(spec.seed)
        deepspeed.init_distributed(dist_backend="gloo" if spec.device == "cpu" else "nccl", auto_mpi_discovery=False)
        lora = LoraSpec(r=spec.lora_r, alpha=spec.lora_alpha) if spec.lora_r else None
        if self.KIND == "policy":
            model = load_policy(spec.model_path, spec.dtype, lora)
        else:
            model = load_reward_model(spec.model_path, spec.dtype, lora, seed=spec.seed)
        if spec.freeze_layers:
            _freeze_lower(model, spec.freeze_layers)
        if spec.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, spec.lr, spec.weight_decay, spec.offload)
        # a warm-up is DeepSpeed's client scheduler, so its step count is saved and resumed with the run; none
        # without one (checkpoints of constant-lr runs carry no scheduler state, and stay loadable)
        warm = spec.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm)) if warm else None
        config = ds_config(spec.micro_batch_size, world_size, spec.grad_clip, spec.zero_stage, spec.dtype,
                           spec.offload)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        self.device = self.engine.device
        if self.KIND == "policy":
            from afd_ray.models.loading import output_layer_splits

            output_layer_splits(getattr(model, "get_base_model", lambda: model)())  # once, before any step
        self.steps = 0
        self._tokenizers: dict[str, object] = {}
        self._offloaded: list | None = None  # what offload_states moved to CPU memory, until reload_states

    # ---- shared helpers -------------------------------------------------------------------------------------

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def _micro_batches(self, n_local: int) -> list[range]:
        """Index ranges of this rank's micro-batches, padded with empty ranges so all ranks run as many."""
        import torch.distributed as dist

        mb = self.spec.micro_batch_size
        count = math.ceil(n_local / mb)
        count = int(self._all_reduce([count], dist.ReduceOp.MAX)[0])
        return [range(i * mb, min((i + 1) * mb, n_local)) for i in range(max(count, 1))]

    def _batch(self, seqs: SequenceBatch, idx: range | list[int]) -> tuple[TokenBatch, bool]:
        """Collate sequences ``idx``; an empty index list yields one dummy sequence (weight 0)."""
        idx = list(idx)
        empty = not idx
        prompts = [seqs.prompts[i] for i in idx] or [seqs.prompts[0] if len(seqs) else [self.spec.pad_token_id]]
        responses = [seqs.responses[i] for i in idx] or [seqs.responses[0] if len(seqs) else [self.spec.pad_token_id]]
        b = collate(prompts, responses, self.spec.pad_token_id)
        return TokenBatch(b.input_ids.to(self.device), b.attention_mask.to(self.device),
                          b.response_mask.to(self.device)), empty

    def _response_rows(self, rows: list[list[float]], b: TokenBatch) -> torch.Tensor:
        """Per-token values of each sequence's response (``rows[j]`` for sequence j of ``b``) placed on
        ``b``'s (B, T-1) next-token grid, where ``b.shifted_mask`` marks the response; zeros elsewhere."""
        t = torch.zeros(b.input_ids.shape[0], b.input_ids.shape[1] - 1, device=self.device)
        for j, row in enumerate(rows):
            if row:
                start = int(b.shifted_mask[j].nonzero()[0])
                t[j, start:start + len(row)] = torch.tensor(row, device=self.device)
        return t

    def _token_logp(self, b: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T-1) log pi of each response token (0 elsewhere) and the response mask aligned with it."""
        from afd_ray.models.loading import response_logprobs

        mask = b.shifted_mask.float()
        return response_logprobs(self.engine.module, b.input_ids, b.attention_mask, mask), mask

    def _step(self, losses_fn, n_local: int) -> dict[str, float]:
        """Forward/backward every micro-batch (``losses_fn(idx) -> (loss, stats)``), then one optimizer step."""
        self.engine.train()
        total, stats_sum = 0.0, {}
        batches = self._micro_batches(n_local)
        for k, idx in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(k == len(batches) - 1)
            loss, stats = losses_fn(idx)
            self.engine.backward(loss)
            total += float(loss.detach())
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(v)
        lr = float(self.engine.get_lr()[0])  # the rate this step uses (the scheduler advances in step())
        # DeepSpeed skips the update (on every rank alike) when the reduced gradients hold a NaN or inf, in
        # ZeRO-2 and ZeRO-3, fp32 included: weights, optimizer moments and lr schedule stay as they were
        self.engine.step()
        applied = self.engine.was_step_applied()
        self.steps += 1
        keys = sorted(stats_sum)
        reduced = self._all_reduce([total] + [stats_sum[k] for k in keys])
        # each rank's micro-batch losses are sum / (global count / world_size): the sum over ranks is
        # world_size times the global mean
        out = {"loss": reduced[0] / self.world_size, "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
               "lr": lr, "nonfinite": 0.0 if applied and math.isfinite(reduced[0]) else 1.0}
        out.update({k: v for k, v in zip(keys, reduced[1:])})
        return out

    # ---- GPU residency (colocated with vLLM engines) ---------------------------------------------------------

    def offload_states(self, keep_weights: bool = True) -> int:
        """Move this rank's training state (fp32 master weights, gradient buffers, Adam moments; with
        ``keep_weights=False`` also ZeRO's 16-bit weights) to CPU memory, so colocated vLLM engines have the
        GPU while they are awake. With the weights kept (the rollout pool's case) forward passes and the
        weight sync still work, which is what happens while the engines are awake (the sync, its probe
        check); a backward, a step or a save must wait for ``reload_states``; with them moved nothing may
        use the model until then. Returns the GPU bytes freed (``torch.cuda.memory_allocated`` before minus
        after).

        A no-op returning 0 on CPU (run.device=cpu: nothing lives on a GPU), with offload="all" (weights and
        optimizer live in CPU memory already; DeepSpeed refuses to move offloaded parameters) and when the
        state is offloaded already."""
        if self.spec.device == "cpu" or self.spec.offload == "all" or self._offloaded is not None:
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        self._offloaded = _offload(self.engine, self.spec.zero_stage, keep_weights)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return before - torch.cuda.memory_allocated()

    def reload_states(self) -> int:
        """Bring back what ``offload_states`` moved; returns the GPU bytes it takes again. A no-op returning
        0 on CPU and when nothing is offloaded."""
        if self._offloaded is None:
            return 0
        before = torch.cuda.memory_allocated()
        _reload(self.engine, self._offloaded)
        self._offloaded = None
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before

    def rendezvous(self) -> tuple[str, int]:
        """This rank's node IP and a free port on it (rank 0 hosts the weight-sync store)."""
        import ray

        from afd_ray.workers.group import free_port

        return ray.util.get_node_ip_address(), free_port()

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save(self, ckpt_dir: str, hf_dir: str | None, tokenizer_path: str | None = None) -> dict[str, int]:
        """DeepSpeed state (weights, optimizer, RNG) into ``ckpt_dir`` on every rank; the HF-format model
        into ``hf_dir`` from rank 0 (gathered under ZeRO-3). Returns the files this rank wrote, relative to
        the parent of ``ckpt_dir``, with their sizes, each fsynced (the runtime verifies them all before it
        commits the checkpoint)."""
        import deepspeed

        from afd_ray import faults

        rng = {"torch": torch.get_rng_state(), "steps": self.steps}
        self.engine.save_checkpoint(ckpt_dir, tag="state", client_state=rng)
        if hf_dir is not None:
            module = self.engine.module
            with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.spec.zero_stage == 3):
                if self.rank == 0:
                    from afd_ray.models.loading import load_tokenizer, save_model

                    if tokenizer_path and tokenizer_path not in self._tokenizers:  # read once, saved every iteration
                        self._tokenizers[tokenizer_path] = load_tokenizer(tokenizer_path)
                    save_model(module, self._tokenizers.get(tokenizer_path), hf_dir)
        faults.point(f"{self.KIND}.save")
        return self._written(Path(ckpt_dir), Path(hf_dir) if hf_dir else None)

    def _written(self, ckpt_dir: Path, hf_dir: Path | None) -> dict[str, int]:
        """This rank's files: its ZeRO shards (``*zero_pp_rank_<rank>_*``); rank 0 also the rest of the
        DeepSpeed folder and the HF folder."""
        root = ckpt_dir.parent
        mine = f"zero_pp_rank_{self.rank}_"
        files = [p for p in ckpt_dir.rglob("*") if p.is_file()
                 and (mine in p.name or (self.rank == 0 and "zero_pp_rank_" not in p.name))]
        if self.rank == 0 and hf_dir is not None:
            files += [p for p in hf_dir.rglob("*") if p.is_file()]
        out = {}
        for p in files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            out[str(p.relative_to(root))] = p.stat().st_size
        return out

    def load(self, ckpt_dir: str) -> int:
        _, client = self.engine.load_checkpoint(ckpt_dir, tag="state")
        torch.set_rng_state(client["torch"])
        self.steps = client["steps"]
        return self.steps



def _freeze_lower(model, n_layers: int) -> None:
    """Freeze the input embeddings and the lowest ``n_layers`` transformer blocks (a cheaper reward model)."""
    from afd_ray.models.loading import transformer_blocks

    getattr(model, "get_base_model", lambda: model)().get_input_embeddings().requires_grad_(False)
    for block in transformer_blocks(model)[:n_layers]:
        block.requires_grad_(False)


# ZeRO buffers DeepSpeed 0.19.8's engine.offload_states moves itself, per stage. ZeRO-3 moves its fp32 master
# partitions and Adam moments only for DeepSpeed's FusedAdam (an assertion): with torch AdamW or CPU Adam those
# two are moved here instead (_to_host), and so are the Adam moments under ZeRO-2, whose own mover would
# bring AdamW's CPU step counters back onto the GPU.
_DEEPSPEED_MOVES = {2: ("hp_params", "lp_params", "lp_grads"), 3: ("lp_params", "lp_grads", "contiguous_grad_buffer")}


def _offload(engine, zero_stage: int, keep_weights: bool = True) -> list[tuple[torch.Tensor, torch.device]]:
    """Move the engine's GPU-resident training state to CPU memory; returns the tensors moved by hand with
    the device each came from (``_reload`` puts them back). DeepSpeed skips what its config offloads already."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

    include = [OffloadStateTypeEnum(name) for name in _DEEPSPEED_MOVES[zero_stage]
               if not (keep_weights and name == "lp_params")]
    engine.offload_states(include=include, device=OffloadDeviceEnum.cpu, pin_memory=True)
    zero_optimizer = engine.optimizer
    tensors = [t for state in zero_optimizer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    if zero_stage == 3:
        tensors += list(zero_optimizer.fp32_partitioned_groups_flat)
    return _to_host(tensors)


def _to_host(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.device]]:
    """Point each accelerator tensor's ``.data`` at a CPU copy (pinned, for fast copies back), in place, so
    whoever holds the tensor (the optimizer's param groups and state) keeps it."""
    moved = []
    for t in tensors:
        if t.device.type != "cpu":
            device = t.device
            t.data = t.data.to("cpu", non_blocking=True)  # a device-to-host non_blocking copy lands in pinned memory
            moved.append((t, device))
    return moved


def _reload(engine, moved: list[tuple[torch.Tensor, torch.device]]) -> None:
    for t, device in moved:
        t.data = t.data.to(device, non_blocking=True)
    engine.reload_states()
