"""Weight sync through vLLM's weight-transfer API, from the learner ranks to every vLLM worker.

vLLM 0.32 ships the protocol: an engine built with ``WeightTransferConfig(backend=...)`` exposes four
phases (``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``), and a trainer-side engine (``WeightTransferTrainerFactory.trainer_init``) drives
them through a client. Backends, chosen by ``afd_ray.placement.sync_backend``:

- ``nccl`` (vLLM's): separate GPUs and nodes; learner rank 0 broadcasts to every TP worker of every engine.
- ``ipc`` (vLLM's): an engine that shares its GPU with a learner rank (colocated) rebuilds CUDA IPC handles
  of that rank's gathered weights; NCCL refuses two ranks of one communicator on one device.
- ``gloo`` (registered here): CPU. The same protocol and the same layerwise reload as vLLM's nccl engine,
  over a gloo group built from a TCPStore (so neither side's default group is touched); only the transport
  differs, so the tests on a CPU machine drive the code path the GPUs use.

The learner side hands its weights as a ``WeightSource`` (``LearnerSource``): HF names and full shapes,
gathered layer by layer under ZeRO-3, LoRA deltas merged inside that gather. Which engines take part and
their rank offsets in the sync group are the client's (``EngineClient``); the weight version each engine
records is the learner step the weights came from.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    layerwise_groups,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from afd_ray import faults

BUCKET_BYTES = 64 << 20  # gloo: one broadcast per bucket of at most this many bytes (one dtype each)


def make_group(master_addr: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0):
    """A gloo process group of ``world_size`` ranks that does not touch the default group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, port, world_size, is_master=(rank == 0), timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("afd_ray_weight_sync", store), rank, world_size, timeout)


def buckets(names: list[str], dtypes: list[str], shapes: list[list[int]], bucket_bytes: int) -> list[range]:
    """Split parameters (in order) into runs of at most ``bucket_bytes`` holding one dtype each (a larger
    tensor gets its own). Sender and receivers compute the same split from the same metadata."""
    out: list[range] = []
    start, size = 0, 0
    for i, (dtype, shape) in enumerate(zip(dtypes, shapes)):
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if i > start and (size + nbytes > bucket_bytes or dtypes[start] != dtype):
            out.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if start < len(names):
        out.append(range(start, len(names)))
    return out


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Worker side: the store on learner rank 0's node; this engine's first rank in the sync group."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0
    bucket_bytes: int = BUCKET_BYTES


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """vLLM worker side of the gloo backend: receive bucket broadcasts and load them with vLLM's layerwise
    reload (``start``/``finish`` as in vLLM's nccl engine), which re-runs each layer's post-load processing
    (on CPU: the GEMM weight prepacking that a plain ``load_weights`` after start would bypass)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank  # this worker's TP rank inside its engine
        self.bucket_bytes = init_info.bucket_bytes
        self.group = make_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        _refresh_cpu_packed(self.model)

    def receive_weights(self, info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine was not called")
        corrupt = faults.fires("rollout.receive_weights") == "nan"  # tests: weights damaged in transit
        for run in buckets(info.names, info.dtype_names, info.shapes, self.bucket_bytes):
            shapes = [info.shapes[i] for i in run]
            flat = torch.empty(sum(torch.Size(s).numel() for s in shapes), dtype=getattr(torch, info.dtype_names[run[0]]))
            self.group.broadcast(flat, 0).wait()
            if corrupt:
                flat.fill_(float("nan"))
            offset, weights = 0, []
            for i, shape in zip(run, shapes):
                n = torch.Size(shape).numel()
                weights.append((info.names[i], flat[offset: offset + n].view(shape)))
                offset += n
            self.model.load_weights(weights)

    def shutdown(self) -> None:
        self.group = None


def _refresh_cpu_packed(model: torch.nn.Module) -> None:
    """vLLM-CPU packs GEMM weights once after loading. A tied lm_head is not among the loaded checkpoint
    tensors (Llama skips ``lm_head.*`` when tied), so its packed copy would keep the old embedding: repack
    every layer that still holds its dense 2-D weight."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (hasattr(module, "cpu_linear") and hasattr(module, "quant_method") and weight is not None
                and weight.ndim == 2 and weight.numel() > 0):
            module.quant_method.process_weights_after_loading(module)


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 600.0
    bucket_bytes: int = BUCKET_BYTES


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Learner side of the gloo backend, shaped as vLLM's nccl trainer engine: the sender (rank 0) opens
    rank 0 of the group while the workers join it, and sends each round while they receive; other ranks
    only iterate the source (under ZeRO-3 the gather is a collective of every rank)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = BUCKET_BYTES) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                  "rank_offset": 1, "world_size": init_info.world_size, "timeout_s": init_info.timeout_s,
                  "bucket_bytes": init_info.bucket_bytes}
        with ThreadPoolExecutor(max_workers=1) as exe:  # the workers block in the rendezvous until rank 0 joins
            future = exe.submit(client.init_weight_transfer_engine, worker)
            engine.group = make_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                      init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        info = GlooUpdateInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                              [list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(info))
            pairs = iter(self.source)
            for run in buckets(info.names, info.dtype_names, info.shapes, self.bucket_bytes):
                tensors = []
                for i in run:
                    name, t = next(pairs)
                    if name != info.names[i]:
                        raise RuntimeError(f"weight source yielded {name!r} where its metadata has {info.names[i]!r}")
                    tensors.append(t.detach().reshape(-1))
                self.group.broadcast(torch.cat(tensors), 0).wait()
            future.result()
        finally:
            exe.shutdown(wait=False)  # a failed broadcast leaves the receivers blocked: do not join them
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make ``gloo`` a backend of vLLM's factories (idempotent; runs on import, so every process that
    imports this module, the vLLM worker through ``EXTENSION`` included, knows it)."""
    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", GlooTrainerWeightTransferEngine)


register()


class WorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): importing this module registers the gloo
    backend in the worker process; the one verb here lets tests damage weights inside an engine."""

    def afd_scale_weights(self, name_part: str, factor: float) -> int:
        n = 0
        for name, p in self.model_runner.get_model().named_parameters():
            if name_part in name:
                p.data.mul_(factor)
                n += 1
        return n


EXTENSION = f"{__name__}.WorkerExtension"


class LearnerSource(WeightSource):
    """The learner's weights as vLLM expects them: HF names (peft prefixes and ``.base_layer`` removed),
    full shapes, gathered one decoder layer at a time under ZeRO-3 (every rank iterates in lockstep: the
    gather is a collective). A LoRA layer yields ``W + delta(A, B)`` computed inside that gather (peft's
    ``get_delta_weight``), so nothing is merged into, or unmerged from, the trained weights."""

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self.module, self.zero3 = module, zero3
        lora = {}
        for name, sub in module.named_modules():
            if hasattr(sub, "get_delta_weight") and hasattr(sub, "base_layer"):
                lora[f"{name}.base_layer.weight"] = sub
        self.lora = lora
        params = dict(module.named_parameters())
        self.entries = [(self._hf(n), n, p) for n, p in params.items() if "lora_" not in n]
        self.by_hf = {hf: (n, p) for hf, n, p in self.entries}

    @staticmethod
    def _hf(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(hf, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for hf, _, p in self.entries]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        for group in layerwise_groups([hf for hf, _, _ in self.entries]):
            params = []
            for hf in group:
                name, p = self.by_hf[hf]
                params.append(p)
                layer = self.lora.get(name)
                if layer is not None:
                    params += [q for q in layer.parameters() if q.requires_grad]
            with torch.no_grad(), deepspeed.zero.GatheredParameters(params, enabled=self.zero3):
                for hf in group:
                    name, p = self.by_hf[hf]
                    t = p.data
                    layer = self.lora.get(name)
                    if layer is not None:
                        for adapter in layer.active_adapters:
                            t = t + layer.get_delta_weight(adapter).to(t.dtype)
                    # the gathered buffer is released at the end of the group: hand out a copy under ZeRO-3
                    yield hf, t.clone() if self.zero3 and t is p.data else t


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` over the rollout actors, used by learner rank 0: each call fans out
    to every engine and waits within the deadline. Engine i gets its own first rank in the sync group
    (``1 + i * tp``), and ``finish_weight_update`` records ``version`` (the learner step) on each engine."""

    def __init__(self, actors: list, tp: int, timeout_s: float | None):
        self.actors, self.tp, self.timeout_s = actors, tp, timeout_s
        self.version: int | None = None

    def _all(self, method: str, args_of) -> list[Any]:
        from afd_ray.workers.group import wait_all

        return wait_all([getattr(a, method).remote(*args_of(i)) for i, a in enumerate(self.actors)],
                        self.timeout_s, f"rollout.{method}")

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("init_weight_transfer_engine", lambda i: (
            {**init_info, "rank_offset": 1 + i * self.tp} if "rank_offset" in init_info else init_info,))

    def start_weight_update(self) -> None:
        self._all("start_weight_update", lambda i: ())

    def update_weights(self, update_info) -> None:
        self._all("update_weights", lambda i: (update_info,))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else (
            None if self.version is None else str(self.version))
        self._all("finish_weight_update", lambda i: (version,))


def trainer_init_info(backend: str, rank: int, master_addr: str, port: int, world_size: int,
                      timeout_s: float) -> TrainerInitInfo:
    """The trainer-side init info of ``backend`` for learner ``rank``."""
    if backend == "gloo":
        return GlooTrainerInitInfo(master_addr, port, world_size, timeout_s=timeout_s, rank=rank)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_addr, port, world_size, rank=rank)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(packed=True, rank=rank)
    raise ValueError(f"weight sync backend must be gloo, nccl or ipc, got {backend!r}")
