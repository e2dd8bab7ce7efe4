"""Evaluation generation: `--engine vllm` (a vLLM rollout engine as a Ray actor) vs `--engine hf` (HF
generate in-process, batches of 16), same prompts, same token budget, in one run.

    .venv/bin/python -m benchmarks.eval_generate [--model PATH] [--prompts 64] [--max-tokens 64]

Default model: SmolLM2-135M-Instruct (the offline default), prompts from the cpu preset's demonstrations.
Reports seconds and generated tokens/s for each engine (vLLM's includes starting the engine and its actor,
as an evaluation pays it) and their ratio. Results: benchmarks/results/eval_generate-*.json.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-offline")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    import ray

    from afd_ray.config import load_config
    from afd_ray.data.build import build_data
    from afd_ray.eval.evaluate import generate, generate_vllm
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    model = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model)
    cfg = load_config("cpu", [f"data.heldout={args.prompts}"])
    _, heldout = build_data(cfg, tokenizer)
    prompts = [e.prompt_ids for e in heldout[: args.prompts]]
    rows = {}
    for engine in ("hf", "vllm"):
        t0 = time.perf_counter()
        if engine == "hf":
            out = generate(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, args.max_tokens,
                           args.temperature)
        else:
            out = generate_vllm(model, prompts, tokenizer, args.max_tokens, args.temperature)
        seconds = time.perf_counter() - t0
        tokens = sum(map(len, out))
        rows[engine] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
        print(f"{engine:5s}: {seconds:6.1f} s, {tokens} tokens, {tokens / seconds:7.1f} tokens/s", flush=True)
    ray.shutdown()
    from benchmarks.common import save

    save("eval_generate", {"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens,
                           "temperature": args.temperature},
         {**rows, "vllm_over_hf_tokens_per_s": rows["vllm"]["tokens_per_s"] / rows["hf"]["tokens_per_s"],
          "hf_over_vllm_seconds": rows["hf"]["seconds"] / rows["vllm"]["seconds"]})


if __name__ == "__main__":
    main()
