"""GPU check: the CUDA IPC weight handoff and afd_ray's DeepSpeed policy learner on one GPU.

Two sections, each guarded (a failure prints its traceback, is recorded, and the next section runs):

  ipc      a 1 GB bf16 bucket exported with ``torch.multiprocessing.reductions.reduce_tensor`` in this process
           and rebuilt in a second (spawned) process with ``rebuild_cuda_tensor``, its device index (argument
           6) overwritten and its handle picked by the GPU's UUID, as vLLM's ipc weight-transfer engine does
           (vllm/distributed/weight_transfer/packed_tensor.py); then copied into a destination buffer.
           Reports GB/s of export -> rebuilt and of the device copy, and exact equality (position-weighted
           int64 checksums of the bit patterns on both sides, plus torch.equal against the shared memory).
  learner  ``afd_ray.workers.policy.PolicyLearner`` in-process (world size 1, rank 0, NCCL; Ray only wraps it
           elsewhere) on a random-initialised Llama of a 1.4B shape, ``PolicyBatch("sft", ...)`` on random
           tokens: tokens/s, MFU (6 * params * tokens / step time / dense bf16 peak of the GPU by name) and
           peak memory for ZeRO-2 and ZeRO-3, each with and without gradient checkpointing; the engine's
           ``offload_states()`` / ``reload_states()`` (time, memory freed, log-probs unchanged afterwards);
           ZeRO-3 with ``offload="optimizer"`` when time is left. Cases whose LearnerSpec field or method is
           missing in this checkout are recorded as skipped.

    python3 benchmarks/gpu_check.py --out $OUT     # one GPU, about 4-6 minutes, stays under --budget-s (450)
    python3 benchmarks/gpu_check.py --quick        # a 0.2B shape and shorter sequences
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke   # no GPU: tiny model, gloo, float32, no ipc

Nothing here imports Ray or vLLM (the result records ``ray_or_vllm_imported`` to prove it).

On the device machine (one H200; torch, transformers, peft and accelerate there; no Ray, no vLLM, and no
DeepSpeed or its pydantic/hjson): carry DeepSpeed 0.19.8 (the .venv's version) as a wheel in ``build/``
(ignored by .gitignore, so it travels only when carried). Here, once:

    .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w build/gpu-wheels  # 2.2 MB, pure Python
    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d build/gpu-wheels \\
        hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \\
        typing-inspection==0.4.5 typing-extensions==4.16.0                             # 2.9 MB together

(the wheel holds no compiled ops: DeepSpeed builds what it needs at first use there (CPU Adam for the offload
case), with nvcc and ninja, which the image has; the sdist, 2 MB, works too: ``pip install --no-deps
--no-build-isolation`` it there). Then one device run with ``carry=["build/gpu-wheels"]``, ``timeout_s=600``:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/gpu-wheels/*.whl \\
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 AFD_RAY_COMMIT=<the short commit hash, written here> \\
      && python3 benchmarks/gpu_check.py --out $OUT

The working tree there has no git history, so the commit comes from AFD_RAY_COMMIT (recorded in the config).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (hidden, layers, heads, kv_heads, intermediate, vocab): Llama-architecture shapes, random weights
SHAPES = {
    "1.4b": (1536, 28, 12, 2, 8960, 32000),   # Qwen2.5-1.5B's body with a 32k vocabulary
    "0.2b": (1024, 16, 16, 4, 2816, 32000),   # --quick
    "tiny": (64, 2, 2, 2, 128, 1024),         # --cpu-smoke
}

# dense bf16 tensor-core peak in TFLOP/s from the vendors' datasheets; first substring of the device name
# that matches (sparse rates are twice these and are not used). An H200 runs a plain 8192^3 bf16 matmul at
# about 770-800 TFLOP/s, so about 0.8 is the practical MFU ceiling there.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0)]

GIB = 2**30


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and key in gpu_name:
            return tflops
    return None


def free_port() -> int:
    # afd_ray.workers.group.free_port imports Ray at module level, which this script must not
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    """Versions and GPU facts that benchmarks.common.machine() does not record."""
    import torch
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        env["deepspeed"] = f"not importable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1), gpu_count=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}",
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    return env


def guarded(name: str, fn, *args) -> dict:
    """Run one section; on failure print the error and record it, so the next section still runs."""
    print(f"\n==== {name} ====", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark section reports any failure and the script goes on
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-12:]}
    out["section_s"] = round(time.perf_counter() - t0, 2)
    return out


# ---- CUDA IPC handoff --------------------------------------------------------------------------------------

def checksum(t) -> list[int]:
    """Exact fingerprint of a bf16 tensor: int64 sums of its 16-bit patterns, plain and position-weighted
    (a swapped pair of elements changes the second). Chunked so the int64 temporaries stay ~1 GB."""
    import torch

    words = t.reshape(-1).view(torch.int16)
    sums = torch.zeros(2, dtype=torch.int64, device=t.device)
    chunk = 1 << 26
    for start in range(0, words.numel(), chunk):
        w = words[start:start + chunk].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
        sums[0] += w.sum()
        sums[1] += (w * pos).sum()
    return [int(v) for v in sums.tolist()]


def gpu_uuid(index: int) -> str:
    import torch

    return str(getattr(torch.cuda.get_device_properties(index), "uuid", index))


def _ipc_consumer(inbox, outbox, device_index: int, numel: int) -> None:
    """The second process (an engine's place): rebuild each exported bucket, copy it out, checksum it."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        torch.cuda.set_device(device_index)
        mine = gpu_uuid(device_index)
        dst = torch.empty(numel, dtype=torch.bfloat16, device=f"cuda:{device_index}")
        outbox.put({"ready": True})
        while (msg := inbox.get()) is not None:
            rep, t_export, handles = msg
            args = list(handles[mine])  # the handle of this process's GPU (each vLLM engine picks its own)
            args[6] = device_index      # rebuild_cuda_tensor's device argument, in this process's numbering
            src = rebuild_cuda_tensor(*args)
            torch.cuda.synchronize()
            t_open = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            t_copy = time.perf_counter()
            same = bool(torch.equal(dst, src))
            del src  # releases this export's mapping (one rebuild per export keeps torch's refcount paired)
            outbox.put({"rep": rep, "handoff_s": t_open - t_export, "copy_s": t_copy - t_open,
                        "checksum": checksum(dst), "equal_to_shared": same})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which records it
        outbox.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def _get(queue, proc, timeout_s: float) -> dict:
    import queue as queue_mod

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            msg = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"ipc consumer process died (exit code {proc.exitcode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"ipc consumer sent nothing for {timeout_s:.0f} s") from None
            continue
        if "error" in msg:
            raise RuntimeError(f"ipc consumer: {msg['error']}\n{msg.get('traceback', '')}")
        return msg


def ipc_section(gb: float, reps: int) -> dict:
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    numel = int(gb * 1e9) // 2
    nbytes = numel * 2
    bucket = torch.empty(numel, dtype=torch.bfloat16, device="cuda:0")
    uuid = gpu_uuid(0)
    # the same copy inside one process, for scale
    dst = torch.empty_like(bucket)
    local = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(bucket)
        torch.cuda.synchronize()
        local.append(time.perf_counter() - t0)
    del dst
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_consumer, args=(inbox, outbox, 0, numel), daemon=True)
    t_start = time.perf_counter()
    proc.start()
    rows = []
    try:
        _get(outbox, proc, 120)
        consumer_start_s = time.perf_counter() - t_start
        for rep in range(reps):
            bucket.normal_(generator=torch.Generator(device="cuda").manual_seed(rep))  # new contents each rep
            expected = checksum(bucket)
            torch.cuda.synchronize()
            t_export = time.perf_counter()
            _, args = reduce_tensor(bucket)
            inbox.put((rep, t_export, {uuid: args}))
            r = _get(outbox, proc, 60)
            row = {"rep": rep, "handoff_s": r["handoff_s"], "copy_s": r["copy_s"],
                   "handoff_plus_copy_GBps": nbytes / (r["handoff_s"] + r["copy_s"]) / 1e9,
                   "copy_GBps": nbytes / r["copy_s"] / 1e9, "checksum_equal": r["checksum"] == expected,
                   "equal_to_shared": r["equal_to_shared"]}
            rows.append(row)
            print(f"  rep {rep}: handoff {row['handoff_s'] * 1e3:.2f} ms, copy {row['copy_s'] * 1e3:.2f} ms, "
                  f"{row['handoff_plus_copy_GBps']:.0f} GB/s, exact {row['checksum_equal']}", flush=True)
    finally:
        inbox.put(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        torch.cuda.ipc_collect()
    later = rows[1:] or rows
    return {
        "bucket_bytes": nbytes, "dtype": "bfloat16", "reps": rows, "consumer_start_s": consumer_start_s,
        "first_rep_handoff_plus_copy_GBps": rows[0]["handoff_plus_copy_GBps"],
        "median_handoff_plus_copy_GBps_after_first": statistics.median(r["handoff_plus_copy_GBps"]
                                                                       for r in later),
        "median_copy_GBps": statistics.median(r["copy_GBps"] for r in rows),
        "same_process_copy_GBps": nbytes / statistics.median(local[1:]) / 1e9,
        "all_exact": all(r["checksum_equal"] and r["equal_to_shared"] for r in rows),
        "note": "GB/s counts the bucket's bytes once (a device copy reads and writes them: HBM traffic is "
                "2x); handoff = reduce_tensor export in the producer -> rebuilt and synchronized in the consumer",
    }


# ---- learner step ------------------------------------------------------------------------------------------

def build_model(out_dir: Path, shape: str, dtype: str, device: str) -> int:
    """A random-initialised LlamaForCausalLM saved in HF format (no tokenizer); returns its parameter
    count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=h // heads, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if device == "gpu" else "cpu"):  # 1.4B weights initialise in seconds on the GPU
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once, as the lm_head
    model.save_pretrained(out_dir)
    del model
    if device == "gpu":
        torch.cuda.empty_cache()
    return params


def _sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def _cleanup(cuda: bool) -> None:
    import gc

    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _allocated_gib(cuda: bool) -> float | None:
    import torch

    return round(torch.cuda.memory_allocated() / GIB, 3) if cuda else None


def offload_round_trip(learner, batch, probe, cuda: bool) -> dict:
    """offload_states() then reload_states(): seconds, GPU memory freed, and the learner unchanged after it
    (log-probs of a probe batch before and after, expected equal; then a finite update)."""
    if not (hasattr(learner, "offload_states") and hasattr(learner, "reload_states")):
        return {"skipped": "DeepSpeedRank has no offload_states()/reload_states() in this checkout"}
    before_lp = learner.logprobs(probe)
    _sync(cuda)
    before = _allocated_gib(cuda)
    t0 = time.perf_counter()
    freed = learner.offload_states()
    _sync(cuda)
    t1 = time.perf_counter()
    offloaded = _allocated_gib(cuda)
    # while offloaded with the weights kept (colocated engines awake): forward passes (the sync's probe
    # check) still work and agree
    during_lp = learner.logprobs(probe)
    taken = learner.reload_states()
    _sync(cuda)
    t2 = time.perf_counter()
    out = {"offload_s": t1 - t0, "reload_s": t2 - t1, "returned_bytes": [freed, taken],
           "allocated_before_gib": before, "allocated_offloaded_gib": offloaded,
           "allocated_reloaded_gib": _allocated_gib(cuda),
           "freed_gib": round(before - offloaded, 3) if cuda else None,
           "probe_logprob_max_abs_diff": max(abs(x - y) for r0, r1 in zip(before_lp, learner.logprobs(probe))
                                             for x, y in zip(r0, r1)),
           "probe_logprob_max_abs_diff_offloaded": max(abs(x - y) for r0, r1 in zip(before_lp, during_lp)
                                                       for x, y in zip(r0, r1))}
    stats = learner.update(batch)
    out.update(loss_after_reload=stats["loss"], nonfinite_after_reload=stats["nonfinite"])
    return out


def learner_case(spec_kw: dict, batch, probe, steps: int, model_params: int, n_tokens: int,
                 peak: float | None, measure_offload: bool) -> dict:
    import torch

    from afd_ray.workers.deepspeed_rank import LearnerSpec
    from afd_ray.workers.policy import PolicyLearner

    cuda = spec_kw["device"] == "gpu"
    _cleanup(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    left_over = _allocated_gib(cuda)  # what earlier cases left allocated (a leak would show here)
    t0 = time.perf_counter()
    learner = PolicyLearner(LearnerSpec(**spec_kw), rank=0, world_size=1, master_addr="127.0.0.1",
                            master_port=free_port())
    _sync(cuda)
    out = {"spec": {k: v for k, v in spec_kw.items() if k != "model_path"}, "allocated_before_start_gib": left_over,
           "start_s": time.perf_counter() - t0, "allocated_after_start_gib": _allocated_gib(cuda),
           "optimizer": type(getattr(learner.engine, "basic_optimizer", None)).__name__}
    try:
        times, losses = [], []
        for i in range(steps + 1):  # step 0 warms up kernels and allocates gradients and optimizer state
            _sync(cuda)
            t = time.perf_counter()
            stats = learner.update(batch)
            _sync(cuda)
            if i:
                times.append(time.perf_counter() - t)
            losses.append(stats["loss"])
            if stats.get("nonfinite"):
                out["nonfinite_steps"] = out.get("nonfinite_steps", 0) + 1
        step = statistics.median(times)
        out.update(step_s=times, step_s_median=step, tokens_per_step=n_tokens, tokens_per_s=n_tokens / step,
                   losses=losses, grad_norm_last=stats["grad_norm"])
        if peak:
            out["mfu"] = 6 * model_params * n_tokens / step / (peak * 1e12)
        if cuda:
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        print(f"  {out['tokens_per_s']:.0f} tokens/s, step {step:.3f} s"
              + (f", MFU {out['mfu']:.3f}" if "mfu" in out else "")
              + (f", peak {out['peak_allocated_gib']:.1f} GiB" if cuda else "")
              + f", loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        if measure_offload:
            out["offload_states"] = offload_round_trip(learner, batch, probe, cuda)
            print(f"  offload_states: {out['offload_states']}", flush=True)
    finally:
        destroy = getattr(learner.engine, "destroy", None)
        if destroy is not None:
            destroy()  # ZeRO-3 leaves hooks on the module otherwise
        del learner
        _cleanup(cuda)
    return out


def learner_section(a, device: str, deadline: float) -> dict:
    import torch

    from afd_ray.types import PolicyBatch, SequenceBatch
    from afd_ray.workers.deepspeed_rank import DeepSpeedRank, LearnerSpec

    cuda = device == "gpu"
    dtype = "float32" if a.cpu_smoke else "bfloat16"
    fields = {f.name for f in dataclasses.fields(LearnerSpec)}
    has = {"gradient_checkpointing": "gradient_checkpointing" in fields, "offload": "offload" in fields,
           "offload_states": hasattr(DeepSpeedRank, "offload_states") and hasattr(DeepSpeedRank, "reload_states")}
    peak = peak_tflops(torch.cuda.get_device_name(0)) if cuda else None
    g = torch.Generator().manual_seed(0)
    prompt_len = max(1, a.seq // 16)
    ids = torch.randint(3, SHAPES[a.shape][5], (a.batch, a.seq), generator=g).tolist()
    seqs = SequenceBatch([r[:prompt_len] for r in ids], [r[prompt_len:] for r in ids])
    batch = PolicyBatch("sft", seqs)
    probe = SequenceBatch(seqs.prompts[:2], seqs.responses[:2])
    n_tokens = a.batch * a.seq  # every position runs forward and backward, prompt tokens too

    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_model_")
    try:
        t0 = time.perf_counter()
        params = build_model(Path(tmp.name), a.shape, dtype, device)
        keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
        out = {"shape": dict(zip(keys, SHAPES[a.shape])), "params": params, "dtype": dtype, "batch": a.batch,
               "seq": a.seq, "prompt_tokens": prompt_len, "micro_batch_size": a.micro_batch,
               "timed_steps": a.steps, "build_s": time.perf_counter() - t0, "peak_bf16_tflops": peak,
               "learner_has": has,
               "mfu_formula": "6 * params * tokens / step_s / peak (tied lm_head counted once; attention "
                              "scores and the recompute of gradient checkpointing not counted)"}
        if cuda and peak is None:
            out["mfu_note"] = f"peak unknown for {torch.cuda.get_device_name(0)!r}: MFU not computed"
            print(out["mfu_note"])
        print(f"model: {params / 1e9:.3f}B parameters, {dtype}, batch {a.batch} x {a.seq} tokens, built in "
              f"{out['build_s']:.1f} s", flush=True)

        base = dict(model_path=tmp.name, dtype=dtype, device=device, micro_batch_size=a.micro_batch)
        gc_on = has["gradient_checkpointing"]
        # (name, extra LearnerSpec fields, timed steps, offload_states round trip, seconds it needs about)
        need = 60 if a.cpu_smoke else (25 if a.quick else 45)
        cases = []
        for z in (2, 3):
            for gc in (False, True):
                extra = {"zero_stage": z}
                if gc_on:
                    extra["gradient_checkpointing"] = gc
                elif gc:
                    extra = None  # the field is missing: recorded as skipped
                # offload_states once per stage, on the checkpointed case (the colocated setting)
                cases.append((f"zero{z}" + ("_gc" if gc else ""), extra, a.steps, gc == gc_on, need))
        # ZeRO-3 with the optimizer in CPU memory: CPU Adam may be JIT-built first (about a minute)
        opt = {"zero_stage": 3, "offload": "optimizer", **({"gradient_checkpointing": True} if gc_on else {})}
        cases.append(("zero3_offload_optimizer", opt if has["offload"] else None, max(1, a.steps - 1), False,
                      2 * need + 60))
        out["cases"] = {}
        for name, extra, steps, round_trip, seconds in cases:
            if extra is None:
                out["cases"][name] = {"skipped": "LearnerSpec lacks gradient_checkpointing/offload here"}
            elif time.monotonic() + seconds > deadline:
                out["cases"][name] = {"skipped": "time budget (--budget-s) spent"}
            else:
                kw = {**base, **({"offload": "none"} if has["offload"] else {}), **extra}
                out["cases"][name] = guarded(name, learner_case, kw, batch, probe, steps, params, n_tokens, peak,
                                             round_trip)
    finally:
        tmp.cleanup()
    return out


# ---- main --------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 0.2B shape, 8 x 512 tokens")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: the learner section on CPU (gloo, float32, tiny model); no ipc section")
    p.add_argument("--batch", type=int, default=None, help="sequences per update (default 16; quick 8; smoke 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; quick 512; smoke 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default 8; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed updates per case after one warm-up (default 3)")
    p.add_argument("--ipc-gb", type=float, default=1.0, help="bucket size of the ipc section, GB")
    p.add_argument("--ipc-reps", type=int, default=5)
    p.add_argument("--skip-ipc", action="store_true")
    p.add_argument("--skip-learner", action="store_true")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget: learner cases that would not fit are skipped (recorded as such)")
    p.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    a = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + a.budget_s - 20  # leave time for the report
    a.shape = "tiny" if a.cpu_smoke else ("0.2b" if a.quick else "1.4b")
    smoke, quick = a.cpu_smoke, a.quick
    a.batch = a.batch or (4 if smoke else 8 if quick else 16)
    a.seq = a.seq or (64 if smoke else 512 if quick else 1024)
    a.micro_batch = a.micro_batch or (2 if smoke else 8)
    a.steps = a.steps or (2 if smoke else 3)

    import torch

    from benchmarks.common import save

    device = "cpu" if smoke else "gpu"
    if device == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; on a machine without a GPU run it with --cpu-smoke")
    os.environ.setdefault("LOCAL_RANK", "0")
    results: dict = {"environment": environment()}
    print(f"environment: {results['environment']}", flush=True)
    if smoke or a.skip_ipc:
        results["ipc"] = {"skipped": "--cpu-smoke (CUDA IPC needs a GPU)" if smoke else "--skip-ipc"}
    else:
        results["ipc"] = guarded("ipc", ipc_section, a.ipc_gb, a.ipc_reps)
    if a.skip_learner:
        results["learner"] = {"skipped": "--skip-learner"}
    else:
        results["learner"] = guarded("learner", learner_section, a, device, deadline)
    results["ray_or_vllm_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm"))
    if results["ray_or_vllm_imported"]:
        print(f"WARNING: Ray or vLLM got imported: {results['ray_or_vllm_imported'][:5]}; the device machine has "
              "neither, so this script would fail there", flush=True)
    results["total_s"] = round(time.monotonic() - start, 1)
    config = {k: v for k, v in vars(a).items() if k != "out"}
    config["device"] = device
    config["source_commit"] = os.environ.get("AFD_RAY_COMMIT", "")
    path = save("gpu_check", config, results, a.out)
    print(f"saved {path} ({results['total_s']} s)")

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
