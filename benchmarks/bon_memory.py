"""Best-of-N memory: peak resident memory of sampling + scoring at N = 16 and N = 256 on the same prompts,
afd_ray's streamed selection (chunks of samples, only the running best kept) next to what a user would
write instead (generate all N samples of every prompt, score them, take the argmax).

    .venv/bin/python benchmarks/bon_memory.py                       # tiny random Llama, 64 prompts, 64 tokens
    .venv/bin/python benchmarks/bon_memory.py --prompts 32 --ns 16 64 256

Each configuration runs in a fresh process (the vLLM engine in-process, the reward model in-process), so
its peak RSS (ru_maxrss) is its own. Results: benchmarks/results/bon_memory-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from afd_ray.methods.irlignment import best_of_n
    from afd_ray.models.loading import load_reward_model, reward_forward
    from afd_ray.types import SamplingSpec, SequenceBatch
    from afd_ray.workers.rollout import RolloutWorker

    torch.set_num_threads(os.cpu_count() or 2)
    engine = RolloutWorker(args.model, max_model_len=16 + args.max_tokens + 8, seed=0,
                           omp_threads_bind=f"0-{(os.cpu_count() or 2) - 1}", kv_cache_gb=1.0)
    rm = load_reward_model(args.model).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @torch.no_grad()
    def score(seqs: SequenceBatch) -> torch.Tensor:
        from afd_ray.data.tokenize import collate

        out = []
        for i in range(0, len(seqs), 256):
            b = collate(seqs.prompts[i:i + 256], seqs.responses[i:i + 256], 0)
            out.append(reward_forward(rm, b.input_ids, b.attention_mask))
        return torch.cat(out)

    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(100, 20000, (8,), generator=g).tolist() for _ in range(args.prompts)]
    streamed = args.mode == "streamed"
    t0 = time.perf_counter()
    rows = best_of_n(engine.generate, score, prompts, [1, args.n], SamplingSpec(temperature=1.0,
                     max_tokens=args.max_tokens, seed=1), prompt_batch=args.prompt_batch if streamed else len(prompts),
                     sample_chunk=args.chunk if streamed else args.n)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": args.mode, "n": args.n, "peak_rss_mb": peak / 1024, "rss_before_bon_mb": before / 1024,
            "seconds": seconds, "samples": args.prompts * args.n,
            "mean_best_reward": sum(rows[args.n].reward) / len(prompts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF causal LM for sampling and the reward backbone; "
                                               "default: a tiny random Llama (built once)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ns", type=int, nargs="+", default=[16, 256])
    p.add_argument("--chunk", type=int, default=16, help="streamed: samples per prompt per generate call")
    p.add_argument("--prompt-batch", type=int, default=16, help="streamed: prompts per batch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if not args.model:
        from afd_ray.models.offline import smollm2_path
        from afd_ray.models.tiny import build_tiny_llama

        cache = Path(os.environ.get("AFD_RAY_CACHE", Path.home() / ".cache" / "afd_ray")) / "bench-tiny-llama"
        if not (cache / "config.json").is_file():
            build_tiny_llama(cache, smollm2_path(), seed=0)
        args.model = str(cache)
    results = []
    for mode in ("streamed", "all_at_once"):
        for n in args.ns:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--n", str(n), "--model", args.model,
                   "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--chunk", str(args.chunk),
                   "--prompt-batch", str(args.prompt_batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise RuntimeError(f"{mode} N={n} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[0].removeprefix("RESULT "))
            print(f"{mode:12s} N={n:4d}: peak RSS {r['peak_rss_mb']:.0f} MB (engine + RM loaded: "
                  f"{r['rss_before_bon_mb']:.0f} MB), {r['seconds']:.1f} s", flush=True)
            results.append(r)
    by = {(r["mode"], r["n"]): r for r in results}
    lo, hi = min(args.ns), max(args.ns)
    ratios = {mode: by[(mode, hi)]["peak_rss_mb"] / by[(mode, lo)]["peak_rss_mb"] for mode in ("streamed", "all_at_once")}
    growth = {mode: (by[(mode, hi)]["peak_rss_mb"] - by[(mode, hi)]["rss_before_bon_mb"])
              / max(by[(mode, lo)]["peak_rss_mb"] - by[(mode, lo)]["rss_before_bon_mb"], 1.0)
              for mode in ("streamed", "all_at_once")}
    from benchmarks.common import save

    save("bon_memory", {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "ns": args.ns,
                        "chunk": args.chunk, "prompt_batch": args.prompt_batch},
         {"runs": results, f"peak_ratio_N{hi}_over_N{lo}": ratios,
          f"bon_growth_ratio_N{hi}_over_N{lo}": growth,
          "streamed_vs_all_at_once_peak_at_max_n": by[("streamed", hi)]["peak_rss_mb"]
          / by[("all_at_once", hi)]["peak_rss_mb"]})


if __name__ == "__main__":
    main()
