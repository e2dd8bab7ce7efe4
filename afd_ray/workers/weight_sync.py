"""Weight sync from learner rank 0 to every vLLM worker over a torch.distributed process group.

The group is separate from the learners' own (DeepSpeed) group: learner rank 0 is rank 0, vLLM worker i is
rank 1 + i. It is built from a TCPStore directly (gloo on CPU, NCCL on GPU), so neither side's default
group is touched. Tensors go in buckets: each bucket is one flat tensor per dtype, broadcast once; the
receivers cut it back into named tensors from metadata the driver passes alongside (names, shapes,
dtypes), and hand them to vLLM's in-place ``reload_weights`` (DESIGN.md Sec. 7: ``load_weights`` after
start fails on CPU because linear weights are prepacked).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from afd_ray import faults

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class TensorMeta:
    """One tensor of a bucket: HF parameter name, shape, dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def make_group(master_addr: str, port: int, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 600.0):
    """A process group of ``world_size`` ranks that does not touch the default group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, port, world_size, is_master=(rank == 0), timeout=timeout)
    store = dist.PrefixStore("afd_ray_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight sync backend must be gloo or nccl, got {backend!r}")


def plan_buckets(named: Iterable[tuple[str, torch.Size, torch.dtype]], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Split (name, shape, dtype) into buckets of at most ``bucket_bytes`` (a larger tensor gets its own)
    holding one dtype each."""
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for name, shape, dtype in named:
        meta = TensorMeta(name, tuple(shape), DTYPE_NAMES[dtype])
        nbytes = meta.numel * torch.empty((), dtype=dtype).element_size()
        if current and (size + nbytes > bucket_bytes or current[0].dtype != meta.dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(meta)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def send_bucket(group, tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Rank 0: broadcast one bucket as a single flat tensor."""
    flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
    group.broadcast(flat, 0).wait()


def receive_bucket(group, bucket: list[TensorMeta], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Other ranks: receive one bucket and yield (name, tensor) views of it."""
    flat = torch.empty(sum(m.numel for m in bucket), dtype=NAME_DTYPES[bucket[0].dtype], device=device)
    group.broadcast(flat, 0).wait()
    offset = 0
    for m in bucket:
        yield m.name, flat[offset: offset + m.numel].view(m.shape)
        offset += m.numel


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called through ``collective_rpc``.

    Arguments arrive serialised, so only plain metadata crosses the rpc; the tensors come over the group.
    """

    def init_weight_sync(self, master_addr: str, port: int, rank_offset: int, world_size: int,
                         backend: str = "gloo") -> None:
        rank = rank_offset + self.rank  # vLLM's worker rank inside this engine (tensor parallel)
        self._afd_sync_group = make_group(master_addr, port, rank, world_size, backend)

    def receive_weights(self, buckets: list[list[dict]]) -> int:
        group = self._afd_sync_group
        device = self.device if hasattr(self, "device") else "cpu"

        corrupt = faults.fires("rollout.receive_weights") == "nan"  # tests: weights damaged in transit

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in buckets:
                for name, t in receive_bucket(group, [TensorMeta(b["name"], tuple(b["shape"]), b["dtype"])
                                                      for b in bucket], device):
                    yield name, t.fill_(float("nan")) if corrupt else t

        self.reload_weights(weights_iterator=weights())
        self._afd_refresh_cpu_packed()
        return sum(len(b) for b in buckets)

    def _afd_refresh_cpu_packed(self) -> None:
        """vLLM-CPU packs GEMM weights once after loading. A tied lm_head is not among the reloaded
        checkpoint tensors (Llama skips ``lm_head.*`` when tied), so its packed copy would keep the old
        embedding: repack every layer that still holds its dense 2-D weight."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if (hasattr(module, "cpu_linear") and hasattr(module, "quant_method") and weight is not None
                    and weight.ndim == 2 and weight.numel() > 0):
                module.quant_method.process_weights_after_loading(module)
