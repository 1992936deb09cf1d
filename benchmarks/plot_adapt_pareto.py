"""Trainable parameters against quality for every adapter of the quality grids (one PNG, two
panels): SmolLM2 on Austen (test perplexity, lower is better) and MiniLM on finefoods (accuracy,
higher is better), x = trainable parameters on a log axis. The Pareto front (no other row has
fewer parameters and better quality) is drawn as a line and its methods are named in bold.

Rows come from ``bench_adapt_quality.py``'s results file: per task the grid's settings (the
settings most rows share), per method the row at the method's documented learning rate (``LR``
of that script; a method without one: its latest row). ``none`` and ``full`` are drawn as
reference lines, not points.

    .venv/bin/python benchmarks/plot_adapt_pareto.py [--results FILE] [--out PNG]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from bench_adapt_quality import DEFAULT_RESULTS, LR
from bench_common import read_rows

METRIC = {"austen": ("ppl_austen", "Austen test perplexity (lower is better)", False),
          "finefoods": ("accuracy", "finefoods accuracy (higher is better)", True)}


def grid_rows(rows: list[dict], task: str) -> list[dict]:
    """One row per method at the task's most common settings and the method's own lr."""
    rows = [r for r in rows if r.get("task") == task]
    if not rows:
        return []
    common = Counter(json.dumps(r["settings"], sort_keys=True) for r in rows).most_common(1)[0][0]
    chosen = {}
    for r in rows:
        if json.dumps(r["settings"], sort_keys=True) != common:
            continue
        if r["method"] not in chosen or r["lr"] == LR.get(r["method"]):
            chosen[r["method"]] = r
    return list(chosen.values())


def pareto(points: list[tuple[float, float, str]], higher_better: bool) -> list:
    """Points no other point beats on both axes (fewer parameters, better metric), by x."""
    front, best = [], None
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1] if higher_better else p[1])):
        if best is None or (y > best if higher_better else y < best):
            front.append((x, y, name))
            best = y
    return front


def panel(ax, rows: list[dict], task: str) -> None:
    key, label, higher = METRIC[task]
    points = [(r["trainable"], r[key], r["method"]) for r in rows
              if r["method"] not in ("none", "full") and r.get(key) is not None
              and r["trainable"] > 0]
    front = pareto(points, higher)
    on_front = {name for _, _, name in front}
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=18, color="tab:blue")
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:orange", lw=1)
    for x, y, name in points:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points",
                    weight="bold" if name in on_front else "normal")
    for ref, style in (("none", ":"), ("full", "--")):
        row = next((r for r in rows if r["method"] == ref and r.get(key) is not None), None)
        if row is not None:
            ax.axhline(row[key], color="grey", ls=style, lw=0.8, label=f"{ref}: {row[key]:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results")
                    / "adapt_pareto.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(args.results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, task in zip(axes, ("austen", "finefoods")):
        chosen = grid_rows(rows, task)
        panel(ax, chosen, task)
        ax.set_title(f"{task}: {len(chosen)} rows")
        front = pareto([(r["trainable"], r[METRIC[task][0]], r["method"]) for r in chosen
                        if r["method"] not in ("none", "full") and r["trainable"] > 0
                        and r.get(METRIC[task][0]) is not None], METRIC[task][2])
        print(f"{task} Pareto front: " + ", ".join(f"{n} ({x:,}, {y:.4g})" for x, y, n in front))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
