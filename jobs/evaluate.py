"""Evaluate run directories or HF checkpoints against each other (afd_ray/eval).

    python jobs/evaluate.py runs/irl-A runs/sft-B --out eval/ --golden afd_ray.toy:golden_reward
    python jobs/evaluate.py runs/irl-A smollm2-offline --config cpu --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model gpt-4o --judge-template helpful            # key from $OPENAI_API_KEY, never logged
    python jobs/evaluate.py runs/irl-A --preferences rewardbench.jsonl --mtbench mt_bench.jsonl ...
    python jobs/evaluate.py runs/irl-A runs/sft-B demonstrations --baseline demonstrations --out eval/ \
        --golden afd_ray.toy:golden_reward      # win rates against the held-out demonstrations (seeds/002)

The judge's API key is read from the environment variable --judge-api-key-env names (default OPENAI_API_KEY),
never from the command line, which every user of the machine sees; it goes over https, or plain http only to
127.0.0.1 / localhost / ::1.

The first target is the baseline of win rates (or --baseline NAME). Evaluation prompts: the held-out
demonstrations of --config (default: the first run directory's config). Writes OUT/report.md, eval.json,
responses.jsonl, PNG plots and plots.json.
"""

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="afd_ray evaluation", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("targets", nargs="+", help="run directories, HF model paths / Hub ids, or `demonstrations` (the "
                                              "held-out demonstrations as responses: --baseline demonstrations "
                                              "gives win rates against them)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default="", help="preset or YAML whose held-out demonstrations are the prompts")
    p.add_argument("--prompts", type=int, default=64, help="evaluation prompts (0 = none: run curves only)")
    p.add_argument("--baseline", default="", help="name of the target that others are compared with")
    p.add_argument("--golden", default="", help="module:function or HF reward model path (golden reward)")
    p.add_argument("--golden-format", default="auto", choices=["auto", "chat", "hh", "pair"],
                   help="how an HF golden reward model reads (x, y) (run.golden_format)")
    p.add_argument("--judge-url", default="", help="OpenAI-compatible base URL for the pairwise judge")
    p.add_argument("--judge-model", default="", help="judge model name")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                   help="environment variable holding the judge's API key (its name, never the key)")
    p.add_argument("--judge-template", default="general", choices=["general", "helpful", "harmless", "summary"])
    p.add_argument("--judge-concurrency", type=int, default=8)
    p.add_argument("--judge-retries", type=int, default=4)
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--preferences", default="", help="preference pairs (RewardBench-style jsonl, or toy)")
    p.add_argument("--mtbench", default="", help="MT-Bench-style question jsonl (needs the judge)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="generate the responses with HF generate in-process, or a vLLM engine (Ray actor)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="where the vLLM engine runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the vLLM engine's dtype (bfloat16 for large models on GPUs)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from afd_ray.config import ConfigError, load_config
    from afd_ray.data.build import build_data
    from afd_ray.eval.evaluate import evaluate, resolve_target
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    try:
        targets = [resolve_target(t) for t in a.targets]
        for t in targets:
            t.policy = resolve_model_path(t.policy) if t.policy else ""
        if not any(t.policy for t in targets):
            raise ValueError("give at least one run directory or model besides the demonstrations")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets must have distinct names, got {names}")
        if a.baseline and a.baseline not in names:
            raise ValueError(f"--baseline {a.baseline!r} is not one of the targets {names}")
        config = a.config or next((str(t.run_dir / "config.yaml") for t in targets if t.run_dir), "")
        tokenizer = load_tokenizer(next(t.policy for t in targets if t.policy))
        prompts = []
        if a.prompts:
            if not config:
                raise ValueError("no evaluation prompts: give --config (a preset or YAML) or a run directory")
            cfg = load_config(config)
            _, heldout = build_data(cfg, tokenizer)
            prompts = heldout[: a.prompts]
        judge = None
        if a.judge_url or a.judge_model:
            if not (a.judge_url and a.judge_model):
                raise ValueError("the judge needs both --judge-url and --judge-model")
            judge = {"base_url": a.judge_url, "model": a.judge_model, "template": a.judge_template,
                     "api_key_env": a.judge_api_key_env, "max_concurrency": a.judge_concurrency,
                     "max_retries": a.judge_retries, "timeout": a.judge_timeout}
        evaluate(targets, prompts, tokenizer, Path(a.out), golden=a.golden, golden_format=a.golden_format,
                 baseline=names.index(a.baseline) if a.baseline else 0, judge=judge, preferences=a.preferences,
                 mtbench=a.mtbench, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                 engine=a.engine, device=a.device, dtype=a.dtype)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {Path(a.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
