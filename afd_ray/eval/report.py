"""Reports and plots: the one report writer of every recipe and of the evaluation (``write_report``), with
the per-iteration table they share. Every plot function returns the series it drew (read back from the
figure's own lines and bars), and ``write_report`` stores them in ``plots.json`` next to the PNGs, so a
test can check a plotted series against the run's metrics."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(line) -> dict[str, list[float]]:
    """The x and y a drawn line holds (what plots.json records)."""
    return {"x": [float(x) for x in line.get_xdata()], "y": [float(y) for y in line.get_ydata()]}


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_run_curves(metrics: list[dict], out: Path, title: str) -> dict[str, dict[str, list[float]]]:
    """Learned reward, KL and held-out diagnostics per iteration of one run (metrics.jsonl rows)."""
    plt = _pyplot()
    panels = [("rollout/reward", "reward of samples"), ("rollout/kl", "KL(pi || pi_ref)"),
              ("heldout/reward_accuracy", "held-out demo-vs-policy accuracy"),
              ("golden/heldout_policy", "golden reward (held-out)")]
    panels = [(k, label) for k, label in panels if any(k in m for m in metrics)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2), squeeze=False)
    drawn: dict[str, dict[str, list[float]]] = {}
    for ax, (key, label) in zip(axes[0], panels):
        rows = [m for m in metrics if key in m]
        (line,) = ax.plot([m["iteration"] for m in rows], [m[key] for m in rows], marker="o")
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=9)
        drawn[key] = _series(line)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, out)
    return drawn


def plot_best_of_n(table: list[dict], out: Path, title: str) -> dict[str, dict[str, list[float]]]:
    """Golden reward (with standard errors) and learned reward against N, log-scale N."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    drawn = {}
    ns = [r["n"] for r in table]
    if all("golden" in r for r in table):
        line = ax.errorbar(ns, [r["golden"] for r in table], yerr=[r["golden_se"] for r in table], marker="o",
                           label="golden reward")[0]
        drawn["golden"] = _series(line)
        ax.set_ylabel("golden reward")
    else:
        (line,) = ax.plot(ns, [r["reward"] for r in table], marker="o", label="learned reward")
        drawn["reward"] = _series(line)
        ax.set_ylabel("learned reward of the selected response")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (Best-of-N)")
    ax.set_title(title, fontsize=9)
    _save(plt, fig, out)
    return drawn


def plot_best_of_n_curves(curves: dict[str, list[dict]], out: Path, title: str) -> dict[str, dict[str, list[float]]]:
    """seeds/000 Fig. 4: per reward model (``curves``: name -> Best-of-N rows), the golden reward of the
    selection (with standard errors) and its win rate against the greedy response, against N (log scale)."""
    plt = _pyplot()
    greedy = any("win_rate_vs_greedy" in r for rows in curves.values() for r in rows)
    fig, axes = plt.subplots(1, 2 if greedy else 1, figsize=(8.5 if greedy else 4.5, 3.2), squeeze=False)
    drawn = {}
    for name, rows in curves.items():
        ns = [r["n"] for r in rows]
        line = axes[0][0].errorbar(ns, [r["golden"] for r in rows], yerr=[r["golden_se"] for r in rows], marker="o",
                                   label=name)[0]
        drawn[f"golden {name}"] = _series(line)
        if greedy:
            (line,) = axes[0][1].plot(ns, [r["win_rate_vs_greedy"] for r in rows], marker="o", label=name)
            drawn[f"win rate vs greedy {name}"] = _series(line)
    for ax, label in zip(axes[0], ("golden reward", "win rate vs greedy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (Best-of-N)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(plt, fig, out)
    return drawn


def plot_judge(results: dict[str, dict], out: Path, title: str) -> dict[str, dict[str, list[float]]]:
    """Stacked win / tie / lose bars, one per compared model."""
    plt = _pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    bottom = [0.0] * len(names)
    drawn = {}
    for key, color in (("win", "#2a9d8f"), ("tie", "#bbbbbb"), ("lose", "#e76f51")):
        vals = [results[n][key] for n in names]
        bars = ax.bar(names, vals, bottom=bottom, color=color, label=key)
        drawn[key] = {"x": list(range(len(names))), "y": [float(b.get_height()) for b in bars]}
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(plt, fig, out)
    return drawn


def pairwise_lines(names: list[str], pairs: list[list[str]], summaries: list[dict]) -> list[str]:
    """seeds/000 Table 2's layout: a row block per policy, its win / tie / lose against each column's policy
    with the standard error in parentheses; ``summaries[i]`` (a ``JudgeResult.summary()``) compares
    ``pairs[i]`` = (a, b) from a's side, each pair once (b against a reads it mirrored)."""
    result = {tuple(p): s for p, s in zip(pairs, summaries)}
    lines = ["| | | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for a in names:
        for k, other in (("win", "lose"), ("tie", "tie"), ("lose", "win")):
            cells = []
            for b in names:
                s, key = (result[(a, b)], k) if (a, b) in result else (result.get((b, a)), other)
                cells.append("-" if s is None else f"{s[key]:.3f} ({s[key + '_se']:.3f})")
            lines.append(f"| {a if k == 'win' else ''} | {k} | " + " | ".join(cells) + " |")
    failed = sum(s.get("failed", 0) for s in summaries)
    if failed:
        lines += ["", f"{failed:.0f} comparisons failed (retries ran out) and are left out of the rates."]
    return lines


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """A markdown table of metrics.jsonl rows: the iteration, then (key, heading) columns; "-" where a row
    lacks a key. Columns no row has are left out."""
    columns = [(k, h) for k, h in columns if any(k in m for m in metrics)]
    lines = ["| it | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for m in metrics:
        lines.append(f"| {m['iteration']:.0f} | " + " | ".join(_cell(m.get(k)) for k, _ in columns) + " |")
    return lines


def phase_times(metrics: list[dict]) -> list[str]:
    """Mean seconds per iteration of each ``time/*`` phase."""
    phases = sorted({k for m in metrics for k in m if k.startswith("time/") and k != "time/iteration"})
    return [f"- {k.removeprefix('time/')}: {sum(m.get(k, 0) for m in metrics) / max(len(metrics), 1):.1f}"
            for k in phases]


def write_report(out_dir: Path, title: str, sections: list[tuple[str, list[str]]],
                 plots: dict[str, dict] | None = None, intro: str = "") -> Path:
    """report.md from (heading, lines) sections, with the PNGs linked; plots.json holds the drawn series."""
    from afd_ray.runtime.files import atomic_write

    lines = [f"# {title}", ""] + ([intro, ""] if intro else [])
    for heading, body in sections:
        lines += [f"## {heading}", "", *body, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in sorted(plots)] + [""]
    if plots is not None:
        atomic_write(out_dir / "plots.json", json.dumps(plots, indent=1))
    atomic_write(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"
