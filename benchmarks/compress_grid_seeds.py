"""The spread over calibration seeds of the grid's shared rows: ours beside llm-compressor.

Reads the row JSONs that ``bench_compress_grid.py`` wrote into one ``--out-dir`` per
``--calib-seed`` and prints, for every own row whose peer row is present in each directory, the
PTB / Austen perplexity per seed, their mean, the ratio ours / peer per seed and of the means,
and the ratio of compression times per seed.
Seeds are checked against each JSON's ``calib_seed`` (a directory mixing seeds is an error).
``--peer-dirs`` (one per seed) supplies peer rows that an own directory lacks -- e.g. own rows run
again with ``--sequential block`` beside the peer rows of the default run; llm-compressor's result
does not depend on our options. A time ratio is only printed for a pair run in one invocation
(same directory); a borrowed pair shows "-".

    python benchmarks/compress_grid_seeds.py benchmarks/results/compress_grid \\
        benchmarks/results/compress_grid_seed1 benchmarks/results/compress_grid_seed2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_grid_rows import grid  # noqa: E402


def load_dir(path: Path) -> tuple[int, dict[str, dict]]:
    """``(calibration seed, {row name: result})`` of one out-dir (rows with no seed: seed 0)."""
    rows = {}
    for f in sorted(path.glob("*.json")):
        r = json.loads(f.read_text())
        if "row" in r:
            rows[r["row"]] = r
    seeds = {r.get("calib_seed", 0) for r in rows.values()}
    if len(seeds) != 1:
        raise SystemExit(f"{path}: rows of calibration seeds {sorted(seeds)}; use one --out-dir "
                         "per seed")
    return seeds.pop(), rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--peer-dirs", nargs="+", type=Path, default=[],
                    help="directories to borrow missing peer rows from (one per seed)")
    args = ap.parse_args(argv)
    by_seed = dict(load_dir(d) for d in args.dirs)
    if len(by_seed) != len(args.dirs):
        raise SystemExit("two directories hold the same calibration seed")
    borrowed = dict(load_dir(d) for d in args.peer_dirs)
    seeds = sorted(by_seed)
    peer_of = {r["name"]: r["peer"] for r in grid() if r["kind"] == "ours" and r["peer"]}
    names = sorted({n for rows in by_seed.values() for n in rows if n in peer_of})
    print(f"calibration seeds {seeds}; dirs: {' '.join(str(d) for d in args.dirs)}")
    print("| row | windows | data | ours per seed | peer per seed | ratio per seed | "
          "ours mean | peer mean | ratio of means | time ratio per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        pairs, times = [], []
        for s in seeds:
            rows = by_seed[s]
            if name not in rows:
                continue
            peer = rows.get(peer_of[name])
            own_run = peer is not None
            if peer is None:
                peer = borrowed.get(s, {}).get(peer_of[name])
            if peer is None:
                continue
            pairs.append((rows[name], peer))
            times.append(f"{rows[name]['compress_seconds'] / peer['compress_seconds']:.3f}"
                         if own_run else "-")
        if len(pairs) < len(seeds):
            print(f"(skipped {name}: present with its peer for {len(pairs)} of {len(seeds)} "
                  "seeds)", file=sys.stderr)
            continue
        print(f"({name}: sequential {', '.join(sorted({o.get('sequential', 'layer') for o, _ in pairs}))}"
              ")", file=sys.stderr)
        for data in ("ptb", "austen"):
            ours = [o[f"ppl_{data}"] for o, _ in pairs]
            peer = [p[f"ppl_{data}"] for _, p in pairs]
            ratios = [a / b for a, b in zip(ours, peer)]
            mo, mp = statistics.mean(ours), statistics.mean(peer)
            print(f"| {name} | {pairs[0][0]['windows']} | {data} | "
                  f"{' / '.join(f'{v:.2f}' for v in ours)} | "
                  f"{' / '.join(f'{v:.2f}' for v in peer)} | "
                  f"{' / '.join(f'{v:.3f}' for v in ratios)} | {mo:.2f} | {mp:.2f} | "
                  f"{mo / mp:.3f} | {' / '.join(times)} |")


if __name__ == "__main__":
    main()
