"""Where the adaptive-rank methods put their ranks: one heat map per method (blocks down,
projections across, the saved rank in each cell) from the Austen quality grid's rows.

AdaLoRA (Zhang et al. 2023) reports that its budget goes mostly to the feed-forward projections
and the top blocks; SoRA (Ding et al. 2023) prunes ranks with its gate; IncreLoRA grows them where
the importance is highest. ``bench_adapt_quality.py`` stores each saved layer's rank (``ranks``);
this plots the row of each method at its documented learning rate and the grid's settings, and
prints the mean rank per projection and per third of the blocks.

    .venv/bin/python benchmarks/plot_adapter_ranks.py [--methods adalora sora increlora]
        [--task austen] [--results FILE] [--out PNG]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench_adapt_quality import DEFAULT_RESULTS
from bench_common import read_rows
from plot_adapt_pareto import grid_rows

BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[list[int]]]:
    """(projection names, rows of ranks per block) from ``{layer name: rank}``."""
    cells = {}
    for name, rank in ranks.items():
        m = BLOCK.search(name)
        if m:
            cells[int(m.group(1)), m.group(2).rsplit(".", 1)[-1]] = rank
    blocks = sorted({b for b, _ in cells})
    projections = list(dict.fromkeys(p for _, p in cells))  # the model's order
    return projections, [[cells.get((b, p), 0) for p in projections] for b in blocks]


def pick(stored: list[dict], task: str, spec: str, grid: dict) -> dict | None:
    """The newest row with saved ranks for ``METHOD`` (at its documented lr) or ``METHOD@LR``,
    at the grid's settings."""
    name, _, lr = spec.partition("@")
    if name not in grid:
        return None
    want = float(lr) if lr else grid[name]["lr"]
    same = [r for r in stored if r.get("task") == task and r["method"] == name and r.get("ranks")
            and r["settings"] == grid[name]["settings"] and r["lr"] == want]
    return same[-1] if same else None


def summary(method: str, projections: list[str], table: list[list[int]]) -> str:
    n = len(table)
    per_proj = ", ".join(f"{p} {sum(row[j] for row in table) / n:.1f}"
                         for j, p in enumerate(projections))
    thirds = [table[i * n // 3:(i + 1) * n // 3] for i in range(3)]
    per_third = ", ".join(f"{sum(map(sum, t)) / max(1, len(t) * len(projections)):.1f}"
                          for t in thirds)
    total = sum(map(sum, table))
    return (f"{method}: total rank {total} over {n * len(projections)} layers; mean per "
            f"projection: {per_proj}; mean per third of the blocks (bottom, middle, top): "
            f"{per_third}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["adalora", "sora", "increlora"],
                    help="METHOD (the row at its documented lr) or METHOD@LR")
    ap.add_argument("--task", default="austen")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results")
                    / "adapter_ranks.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = read_rows(args.results)
    grid = {r["method"]: r for r in grid_rows(stored, args.task)}
    rows = {spec: pick(stored, args.task, spec, grid) for spec in args.methods}
    missing = [m for m in args.methods if not rows.get(m)]
    if missing:
        raise SystemExit(f"no {args.task} row with saved ranks for {missing}: run "
                         f"bench_adapt_quality.py --task {args.task} --methods {' '.join(missing)}")
    fig, axes = plt.subplots(1, len(args.methods), figsize=(4 * len(args.methods), 7))
    for ax, method in zip(list(getattr(axes, "flat", [axes])), args.methods):
        row = rows[method]
        projections, table = rank_table(row["ranks"])
        image = ax.imshow(table, aspect="auto", cmap="viridis", origin="lower",
                          vmin=0, vmax=row["settings"]["r"])
        ax.set_xticks(range(len(projections)), projections, rotation=45, fontsize=7)
        ax.set_ylabel("block")
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items())
        ax.set_title(f"{method} (lr {row['lr']:g}{', ' + params if params else ''})", fontsize=8)
        fig.colorbar(image, ax=ax, label="saved rank")
        print(summary(method, projections, table))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
