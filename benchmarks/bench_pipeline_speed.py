"""Time and peak memory of the pipeline's old default (batch 8, glibc's heap) against the new one.

``run_pipeline`` now defaults to batch 2 with ``heap="trim"`` (``malloc_trim`` after every block),
chosen for memory (bench_pipeline_memory.py). This checks what that costs in time: each setting
runs ``bench_pipeline_memory.py`` (SmolLM2-135M, Gram statistics on all 210 projections,
N × seqlen PTB-train windows) in its own process (a fresh heap each), ALTERNATING
the settings for --repeats rounds, and reports per setting the median pipeline seconds, its ratio
to the old default measured in the same run, and the median pipeline peak over the expected
working set (net of the runtime overhead; target <= 1.25).

    .venv/bin/python benchmarks/bench_pipeline_speed.py [--n 32] [--seqlen 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"batch 8, glibc heap (old default)": ["--batch-size", "8", "--heap", "default"],
            "batch 2, trim (new default)": ["--batch-size", "2", "--heap", "trim"]}


def run_once(flags, n, seqlen) -> tuple[float, float]:
    script = Path(__file__).with_name("bench_pipeline_memory.py")
    out = subprocess.run([sys.executable, str(script), "--n", str(n), "--seqlen", str(seqlen),
                          *flags], capture_output=True, text=True, check=True).stdout
    seconds = float(re.search(r"pipeline time ([\d.]+) s", out).group(1))
    net = float(re.search(r"\(peak - overhead\) / expected ([\d.]+)", out).group(1))
    return seconds, net


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.repeats} "
          f"alternating rounds, one process per run", flush=True)
    times = {k: [] for k in SETTINGS}
    nets = {k: [] for k in SETTINGS}
    names = list(SETTINGS)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, net = run_once(SETTINGS[name], args.n, args.seqlen)
            times[name].append(seconds)
            nets[name].append(net)
            print(f"round {r + 1}: {name}: {seconds:.1f} s, net peak ratio {net:.3f}", flush=True)
    base = statistics.median(times[names[0]])
    print("\n| setting | median s | vs old default | (peak − overhead) / expected |")
    print("|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.1f} | {t / base:.2f} | {statistics.median(nets[name]):.3f} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
