"""Does the IRL loop from pi_SFT move a measurable trait of the demonstrations beyond pi_SFT?

    .venv/bin/python -m benchmarks.trait [--config cpu] [--heldout 256] [--iterations 12] [section.key=value ...]

The cpu preset's run (SmolLM2-135M-Instruct; demonstrations: chitchat answers that ask the other person a
question, offline:chitchat-questions; golden reward: whether a response asks one,
afd_ray.data.offline:asks_question) with --heldout held-out prompts: pi_SFT trained first on the same
demonstrations, then the IRL loop from it (seeds/002, seeds/004). pi_SFT and the final policy answer every
held-out prompt once with the same sampling seed (the run's sft_heldout.json and final_heldout.json), so the
benchmark reports each one's trait share with its standard error and the paired difference (final - pi_SFT)
with its standard error; the model as given (no SFT) answers too, as the reference. The run directory stays
under --out. Results: benchmarks/results/trait-*.json.

The run where IRL moved the trait beyond noise (docs/LOG.md, 2026-12-06; 25 min on 2 cores):

    .venv/bin/python -m benchmarks.trait --iterations 24 data.probe=32 sft.max_steps=10 sft.lr=5e-5 \
        reward.lr=1e-4 reward.freeze_layers=16 policy.lr=3e-5
"""

from __future__ import annotations

import argparse
import json
import math
import time


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b per prompt and its standard error."""
    from afd_ray.eval.golden import mean_se

    return mean_se([x - y for x, y in zip(a, b)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu")
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--out", default="runs/bench-trait")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    from afd_ray.config import load_config
    from afd_ray.data.build import build_data
    from afd_ray.eval.golden import load_golden, mean_se
    from afd_ray.models.loading import load_tokenizer, resolve_model_path
    from afd_ray.run import run
    from afd_ray.runtime.system import sample_once

    cfg = load_config(args.config, [f"data.heldout={args.heldout}", f"run.iterations={args.iterations}",
                                    *args.overrides, f"run.output_dir={args.out}",
                                    f"run.name=trait-{time.strftime('%Y%m%d-%H%M%S')}"])
    if not cfg.run.golden_reward:
        raise SystemExit(f"--config {args.config} sets no run.golden_reward: the trait needs one")
    started = time.perf_counter()
    rd = run(cfg)
    seconds = time.perf_counter() - started
    init = resolve_model_path(cfg.model.policy)
    tokenizer = load_tokenizer(init)
    _, heldout = build_data(cfg, tokenizer)
    prompts = [d.prompt_ids for d in heldout]
    golden = load_golden(cfg.run.golden_reward, tokenizer, cfg.run.golden_format)
    responses = {"pi_SFT": json.loads((rd.path / "sft_heldout.json").read_text()),
                 "IRL from pi_SFT": json.loads((rd.path / "final_heldout.json").read_text()),
                 "model as given": sample_once(cfg, init, prompts, tokenizer, seed=cfg.run.seed * 1_000_003 + 41),
                 "demonstrations": [d.response_ids for d in heldout]}
    scores = {name: golden(prompts, rs) for name, rs in responses.items()}
    diff, diff_se = paired(scores["IRL from pi_SFT"], scores["pi_SFT"])
    metrics = rd.metrics()
    results = {
        "prompts": len(prompts), "seconds": seconds, "run_dir": str(rd.path),
        "trait": {name: dict(zip(("mean", "se"), mean_se(s))) for name, s in scores.items()},
        "irl_minus_sft": {"mean": diff, "se": diff_se, "z": diff / diff_se if diff_se > 0 else math.inf},
        "per_iteration": [{k: m[k] for k in ("iteration", "golden/train_samples", "heldout/reward_accuracy",
                                                "rollout/kl") if k in m} for m in metrics],
        "examples": {name: [tokenizer.decode(r, skip_special_tokens=True) for r in rs[:4]]
                     for name, rs in responses.items()},
    }
    from benchmarks.common import save

    for name, t in results["trait"].items():
        print(f"{name:>16}: {t['mean']:.3f} ± {t['se']:.3f}")
    print(f"IRL - pi_SFT (paired): {diff:+.3f} ± {diff_se:.3f}")
    save("trait", {"config": args.config, "heldout": args.heldout, "iterations": args.iterations,
                   "overrides": args.overrides}, results)


if __name__ == "__main__":
    main()
