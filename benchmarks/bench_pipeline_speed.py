"""Time and peak memory of the pipeline under several batch / heap settings, alternating.

Each setting runs ``bench_pipeline_memory.py`` (SmolLM2-135M, Gram statistics on all 210
projections, N × seqlen PTB-train windows, the pipeline's default order) in its own process (a
fresh heap each), ALTERNATING the settings for --repeats rounds (the order reversed every other
round), and reports per setting the median pipeline seconds, its ratio to the FIRST setting
measured in the same run, the spread (min-max), and the median pipeline peak over the expected
working set (net of the runtime overhead; target <= 1.25). A setting is ``BATCH:HEAP`` with HEAP
one of run_pipeline's ``heap`` values (trim: malloc_trim after every block; keep: freed memory
kept for reuse; default: glibc's own behaviour).

    .venv/bin/python benchmarks/bench_pipeline_speed.py [--settings 2:trim 2:keep] [--n 32]
        [--seqlen 512] [--repeats 3] [--threads 2] [--stats-dtype float32] [--churn-mb 256]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

CHURN = """
import sys, time
n, end = int(sys.argv[1]) << 20, time.time() + float(sys.argv[2])
while time.time() < end:  # fresh pages, each touched once, then handed back
    b = bytearray(n)
    b[::4096] = bytes(len(range(0, n, 4096)))
    del b
"""


def run_once(setting: str, args) -> tuple[float, float]:
    """One pipeline run (beside a page-faulting neighbour process with --churn-mb)."""
    neighbour = (subprocess.Popen([sys.executable, "-c", CHURN, str(args.churn_mb), "3600"])
                 if args.churn_mb else None)
    try:
        return _run_once(setting, args)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def _run_once(setting: str, args) -> tuple[float, float]:
    batch, heap = setting.split(":")
    script = Path(__file__).with_name("bench_pipeline_memory.py")
    out = subprocess.run([sys.executable, str(script), "--n", str(args.n), "--seqlen",
                          str(args.seqlen), "--batch-size", batch, "--heap", heap,
                          "--stats-dtype", args.stats_dtype,
                          *(["--threads", str(args.threads)] if args.threads else [])],
                         capture_output=True, text=True, check=True).stdout
    seconds = float(re.search(r"pipeline time ([\d.]+) s", out).group(1))
    net = float(re.search(r"\(peak - overhead\) / expected ([\d.]+)", out).group(1))
    return seconds, net


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=["2:trim", "2:keep"],
                    help="BATCH:HEAP per setting; ratios are to the first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stats-dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--churn-mb", type=int, default=0,
                    help="run a neighbour process beside every run that allocates, touches and "
                    "frees this many MB in a loop (a busy machine's page faults; one core)")
    args = ap.parse_args(argv)
    for setting in args.settings:
        batch, _, heap = setting.partition(":")
        if not batch.isdigit() or heap not in ("trim", "keep", "default"):
            ap.error(f"--settings: {setting!r} is not BATCH:HEAP (HEAP: trim, keep, default)")
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.repeats} "
          f"alternating rounds, one process per run"
          + (f", beside a neighbour churning {args.churn_mb} MB" if args.churn_mb else ""),
          flush=True)
    names = list(args.settings)
    times = {k: [] for k in names}
    nets = {k: [] for k in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, net = run_once(name, args)
            times[name].append(seconds)
            nets[name].append(net)
            print(f"round {r + 1}: {name}: {seconds:.1f} s, net peak ratio {net:.3f}", flush=True)
    base = statistics.median(times[names[0]])
    print(f"\n| batch:heap | median s | min-max s | vs {names[0]} | (peak − overhead) / expected |")
    print("|---|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | "
              f"{t / base:.3f} | {statistics.median(nets[name]):.3f} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
