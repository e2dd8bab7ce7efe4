"""One IRL run's phase split and per-role rates, iteration by iteration.

    .venv/bin/python -m benchmarks.irl_iteration [--config cpu] [--iterations 2] [section.key=value ...]

Runs the recipe in-process on the given preset and overrides (default: the embedded `cpu` preset, 2
iterations) and reports, for each iteration, the seconds of every phase (rollout, reward, forward: reward
scores, reference, old log-probs and values at once, policy, sync, diagnostics, checkpoint), each phase's
share of the iteration, and the per-role rates (`throughput/*`). Iteration 1 includes engine warm-up
(first prefill, allocator), so the summary is the mean over the later iterations when there are any.
Results: benchmarks/results/irl_iteration-*.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    from afd_ray.config import load_config
    from afd_ray.run import run

    with tempfile.TemporaryDirectory() as out:
        # the loop's iterations from the preset's model as given (model.sft=PATH or empty overrides it)
        cfg = load_config(args.config, ["model.sft=none", *args.overrides, f"run.iterations={args.iterations}",
                                        f"run.output_dir={out}", "run.name=bench"])
        metrics = run(cfg, echo=lambda *_: None).metrics()
    rows = []
    for m in metrics:
        total = m["time/iteration"] + m.get("time/checkpoint", 0.0)
        phases = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/") and k != "time/iteration"}
        rows.append({"iteration": int(m["iteration"]), "seconds": total, "phases": phases,
                     "share": {k: v / total for k, v in phases.items()},
                     "rates": {k.removeprefix("throughput/"): v for k, v in m.items() if k.startswith("throughput/")}})
        print(f"iteration {int(m['iteration'])}: {total:6.1f} s  " +
              "  ".join(f"{k} {v:.1f}s ({v / total:.0%})" for k, v in phases.items()), flush=True)
    steady = rows[1:] or rows
    summary = {"seconds": statistics.mean(r["seconds"] for r in steady),
               "phases": {k: statistics.mean(r["phases"].get(k, 0.0) for r in steady) for k in steady[0]["phases"]},
               "rates": {k: statistics.mean(r["rates"].get(k, 0.0) for r in steady) for k in steady[0]["rates"]}}
    from benchmarks.common import save

    save("irl_iteration", {"config": args.config, "iterations": args.iterations, "overrides": args.overrides},
         {"iterations": rows, "steady": summary})


if __name__ == "__main__":
    main()
