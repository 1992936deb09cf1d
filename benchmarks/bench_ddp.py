"""Data-parallel training (DDP, gloo on CPU): 2 processes against 1 on the same global batch.

``slimtune pretrain`` of the grid's small Llama (384 x 6, 6 heads; PTB, seqlen --seqlen) for
--steps steps of a global batch of --global-batch windows, started either as one process
(--global-batch windows per micro-batch, --threads torch threads) or under ``torchrun
--nproc-per-node 2`` (half the windows each, --threads / 2 threads each, so both use the same
cores), alternating, --rounds rounds. Printed per round and as medians: the median step seconds
and tokens/s (global batch x seqlen / step seconds), and whether the two runs' losses agree
(they see the same windows: within 1e-4 relative). On a 2-core machine two processes only split
the same two cores, so this shows that DDP is correct and what its overhead is more than any
speed-up: on more cores (or GPUs) each process would have its own.

    .venv/bin/python benchmarks/bench_ddp.py [--steps 12] [--global-batch 4] [--seqlen 256]
        [--rounds 2] [--threads 2] [--method full] [--optimizer adamw] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ROOT, cpu_model, git_commit

BIN = ROOT / ".venv" / "bin"


def run(processes: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        common = ["-q", "pretrain", "--hidden", "384", "--layers", "6", "--heads", "6",
                  "--data", "ptb", "--seqlen", str(args.seqlen), "--tokens",
                  str(args.steps * args.global_batch * args.seqlen), "--global-batch",
                  str(args.global_batch), "--eval-tokens", str(args.seqlen), "--method",
                  args.method, "--optimizer", args.optimizer, "--out", str(out)]
        if processes == 1:
            cmd = [str(BIN / "slimtune"), *common]
        else:
            cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(processes),
                   str(BIN / "slimtune"), *common]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
        history = json.loads((out / "history.json").read_text())
    seconds = statistics.median(s["seconds"] for s in history["steps"][2:])
    return {"seconds": seconds, "tokens_per_s": args.global_batch * args.seqlen / seconds,
            "losses": [s["loss"] for s in history["steps"]],
            "peak_rss_mb": history["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="full")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"# DDP: llama 384x6 on PTB, {args.method} + {args.optimizer}, global batch "
          f"{args.global_batch} x {args.seqlen}, {args.steps} steps, {args.threads} threads in "
          f"all, {cpu_model()}, commit {git_commit()}", flush=True)
    results = {1: [], 2: []}
    for rnd in range(args.rounds):
        for n in ([1, 2] if rnd % 2 == 0 else [2, 1]):
            results[n].append(run(n, args))
        one, two = results[1][-1], results[2][-1]
        agree = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
        print(f"round {rnd + 1}: 1 process {one['tokens_per_s']:.0f} tokens/s, 2 processes "
              f"{two['tokens_per_s']:.0f} tokens/s; losses agree within {agree:.1e}",
              file=sys.stderr, flush=True)
    summary = {n: {"seconds": statistics.median(r["seconds"] for r in v),
                   "tokens_per_s": statistics.median(r["tokens_per_s"] for r in v),
                   "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in v)}
               for n, v in results.items()}
    agree = max(abs(a - b) / abs(b) for r1, r2 in zip(results[1], results[2])
                for a, b in zip(r2["losses"], r1["losses"]))
    for n, s in summary.items():
        print(f"{n} process{'es' if n > 1 else ''}: {s['seconds']:.2f} s/step, "
              f"{s['tokens_per_s']:.0f} tokens/s, peak RSS {s['peak_rss_mb_per_process']:.0f} "
              f"MB per process")
    print(f"2 / 1 processes tokens/s: {summary[2]['tokens_per_s'] / summary[1]['tokens_per_s']:.2f}"
          f"; losses of the two agree within {agree:.1e} (relative, every step of every round)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "summary": summary,
                                         "loss_agreement": agree, "cpu": cpu_model(),
                                         "commit": git_commit()}, indent=1))


if __name__ == "__main__":
    main()
