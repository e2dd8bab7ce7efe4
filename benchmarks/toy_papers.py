"""The papers' orderings in miniature, on the toy task's exact golden reward (afd_ray.toy).

    .venv/bin/python -m benchmarks.toy_papers [--parts choices,bt,methods] [--seeds 0]

- ``choices``: seeds/000 Table 1 / Sec. 4.2: Best-of-N from pi_SFT with the discriminator trained on each
  data choice (Init-SFT, Init-Demo, SFT-Demo, side by side on one pool of samples: bon.compare_choices);
  golden reward of the selection at each N; on the plain toy and on ``toy-styled`` (the demonstrations
  closed by a format mark pi_SFT never writes).
- ``bt``: seeds/000 Sec. 4.2-4.3: the Init-SFT discriminator's Best-of-N beside Bradley-Terry reward models
  (seeds/004 Eq. 13) trained on --pairs toy preference pairs labelled by a Bradley-Terry annotator on the
  golden reward at temperature tau (afd_ray.toy.make_preferences; tau = 0: the golden ranking itself),
  all on the same pool of pi_SFT samples.
- ``methods``: seeds/002's ordering: IRL from pi_SFT against SPIN and pi_SFT, the same samples per
  iteration (rollout.prompts_per_iteration x rollout.n for the same iterations), every final policy
  sampled once per held-out prompt with one seed and scored by the golden reward.

pi_init and pi_SFT are the test suite's: a tiny Llama behaviour-cloned from scratch for 20 (--init-steps) /
60 steps.
Results: benchmarks/results/toy_papers-*.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def models(root: Path, tokenizer, smollm2: str, init_steps: int) -> tuple[str, str]:
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 1024, seed=0)
    init = toy.sft_from_scratch(root / "init", smollm2, demos, steps=init_steps, batch_size=32)
    sft = toy.sft_from_scratch(root / "sft", smollm2, demos, steps=60, batch_size=32)
    return str(init), str(sft)


def bon_config(root: Path, init: str, sft: str, name: str, *overrides: str):
    from afd_ray.config import load_config

    return load_config("toy", ["run.method=inverse_rlignment", f"model.policy={init}", f"model.sft={sft}",
                               f"run.output_dir={root}", f"run.name={name}", "bon.n=1,4,16", "bon.rm_epochs=3",
                               "reward.lr=1e-3", "bon.prompt_batch=128", *overrides])


def golden_curve(result: dict, key: str = "golden") -> dict[int, float]:
    """``key`` ("golden" or "golden_se") of each N's Best-of-N row."""
    return {row["n"]: row[key] for row in result["best_of_n"]}


def choices(root: Path, init: str, sft: str, seed: int, sources: list[str]) -> dict:
    """Every data choice side by side in one run per source (bon.compare_choices: the same pool of samples),
    on the plain toy and on toy-styled (a heterogeneous demonstrator's format mark)."""
    import json

    from afd_ray.run import run

    out = {}
    for source in sources:
        rd = run(bon_config(root, init, sft, f"{source}-choices-{seed}", "bon.data_choice=init_sft",
                            "bon.compare_choices=init_demo,sft_demo", f"data.demonstrations={source}",
                            f"run.seed={seed}"), echo=lambda *_: None)
        result = json.loads((rd.path / "bon.json").read_text())
        for choice, side in result["choices"].items():
            out[f"{source}/{choice}"] = {
                "golden": golden_curve(side), "golden_se": golden_curve(side, "golden_se"),
                "heldout_pairwise_accuracy": side["discriminator/heldout_pairwise_accuracy"]}
            print(source, choice, out[f"{source}/{choice}"], flush=True)
    return out


def bradley_terry(root: Path, init: str, sft: str, tokenizer, seed: int, taus: list[float], pairs: list[int]) -> dict:
    import json

    from afd_ray import toy
    from afd_ray.run import run

    out = {}
    for tau, k in ((t, k) for t in taus for k in pairs):
        prefs = toy.make_preferences(tokenizer, k, seed=5 + seed, annotator_temperature=tau)
        golden = toy.golden_reward([p.prompt_ids for p in prefs], [p.chosen_ids for p in prefs], tokenizer)
        worse = toy.golden_reward([p.prompt_ids for p in prefs], [p.rejected_ids for p in prefs], tokenizer)
        agree = sum(a > b for a, b in zip(golden, worse)) / len(prefs)
        bt = toy.reward_model_from_preferences(root / f"bt-{tau}-{k}-{seed}", sft, tokenizer, prefs, steps=120)
        rd = run(bon_config(root, init, sft, f"bt-{tau}-{k}-{seed}", f"bon.compare_reward={bt}", f"run.seed={seed}"),
                 echo=lambda *_: None)
        result = json.loads((rd.path / "bon.json").read_text())
        out[f"{tau}/{k}"] = {"labels_agree_with_golden": agree, "irl_rm": golden_curve(result),
                             "bt_rm": golden_curve(result["compare"]),
                             "irl_rm_se": golden_curve(result, "golden_se"),
                             "bt_rm_se": golden_curve(result["compare"], "golden_se")}
        print("tau", tau, "pairs", k, out[f"{tau}/{k}"], flush=True)
    return out


def methods(root: Path, sft: str, tokenizer, seed: int, iterations: int) -> dict:
    from afd_ray.config import load_config
    from afd_ray.data.build import build_data
    from afd_ray.eval.golden import mean_se
    from afd_ray.run import run
    from afd_ray.runtime.system import sample_once
    from afd_ray.toy import golden_reward

    common = [f"model.policy={sft}", f"run.output_dir={root}", f"run.iterations={iterations}", f"run.seed={seed}"]
    irl = run(load_config("toy", [*common, f"run.name=irl-{seed}"]), echo=lambda *_: None)
    spin = run(load_config("toy", [*common, f"run.name=spin-{seed}", "run.method=spin", "policy.lr=3e-3",
                                   "policy.dpo_beta=0.5", "policy.mini_batches=2"]), echo=lambda *_: None)
    cfg = load_config("toy", common)
    _, heldout = build_data(cfg, tokenizer)
    prompts = [d.prompt_ids for d in heldout]
    policies = {"sft": sft, "spin": str(spin.path / "policy"),
                "irl": str(irl.latest().path / "policy")}
    out = {}
    for name, path in policies.items():
        g = golden_reward(prompts, sample_once(cfg, path, prompts, tokenizer, seed=777 + seed), tokenizer)
        out[name] = dict(zip(("golden", "se"), mean_se(g)))
        print(name, out[name], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="choices,bt,methods")
    p.add_argument("--seeds", default="0")
    p.add_argument("--taus", default="0,0.25,0.5,1")
    p.add_argument("--pairs", default="256,1024", help="preference pairs per Bradley-Terry model (comma list)")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--init-steps", type=int, default=20, help="pi_init's steps (pi_SFT: 60; the suite's: 20)")
    p.add_argument("--sources", default="toy,toy-styled", help="demonstration sources of the choices part")
    args = p.parse_args()
    from afd_ray.models.loading import load_tokenizer, resolve_model_path

    smollm2 = resolve_model_path("smollm2-offline")
    tokenizer = load_tokenizer(smollm2)
    parts = args.parts.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init, sft = models(root, tokenizer, smollm2, args.init_steps)
        for seed in map(int, args.seeds.split(",")):
            r = results.setdefault(str(seed), {})
            if "choices" in parts:
                r["choices"] = choices(root, init, sft, seed, args.sources.split(","))
            if "bt" in parts:
                r["bt"] = bradley_terry(root, init, sft, tokenizer, seed, [float(t) for t in args.taus.split(",")],
                                        [int(k) for k in args.pairs.split(",")])
            if "methods" in parts:
                r["methods"] = methods(root, sft, tokenizer, seed, args.iterations)
    from benchmarks.common import save

    save("toy_papers", vars(args), results)


if __name__ == "__main__":
    main()
