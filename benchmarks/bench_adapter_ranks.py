"""One trained adapter evaluated at every rank b <= r, through the command line (DyLoRA's claim).

DyLoRA (Valipour et al. 2023) trains one adapter so that its first b components work for every
b <= r (it reports near-constant GLUE scores across ranks, where a LoRA truncated below its
training rank degrades). For each method in --methods (default: dylora, and lora as the control)
this script runs::

    slimtune adapt -m smollm2-135m --method M --data austen --steps 100 --batch 4 --seqlen 128
        --lr LR --r 16 --alpha 32 --seed 0 --eval-tokens 512 --out WORK/M
    slimtune eval --adapter WORK/M --adapter-rank b --data austen --seqlen 512
        --max-tokens 8192 --batch-size 4 --json          (b in --ranks, default 1 2 4 8 16)

and the base model's perplexity once (no adapter). The training settings are the Austen quality
grid's (bench_adapt_quality.py, with its learning rate per method). A finished training in WORK is
reused (delete WORK/M to retrain). Rows go to a JSON-lines file; rows already there with the same
method, lr, rank and settings are skipped, so an interrupted run resumes.

    .venv/bin/python benchmarks/bench_adapter_ranks.py [--methods dylora lora] [--ranks 1 2 4 8 16]
        [--work DIR] [--results FILE] [--table]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_adapt_quality import LR
from bench_common import append_row, read_rows

DEFAULT_RESULTS = Path(__file__).with_name("results") / "adapter_ranks.jsonl"
SLIMTUNE = Path(sys.executable).with_name("slimtune")
TRAIN = {"model": "smollm2-135m", "data": "austen", "steps": 100, "batch": 4, "seqlen": 128,
         "r": 16, "alpha": 32.0, "seed": 0}
EVAL = {"seqlen": 512, "max_tokens": 8192, "batch_size": 4}


def slimtune(*args: str) -> str:
    proc = subprocess.run([str(SLIMTUNE), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"slimtune {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def train(method: str, lr: float, out: Path) -> None:
    if (out / "adapter.json").exists():
        return
    t = TRAIN
    slimtune("adapt", "-m", t["model"], "--method", method, "--data", t["data"], "--steps",
             str(t["steps"]), "--batch", str(t["batch"]), "--seqlen", str(t["seqlen"]), "--lr",
             str(lr), "--r", str(t["r"]), "--alpha", str(t["alpha"]), "--seed", str(t["seed"]),
             "--eval-tokens", "512", "--out", str(out), "--overwrite")


def perplexity(*adapter_args: str) -> float:
    e = EVAL
    model = [] if adapter_args else ["-m", TRAIN["model"]]
    out = slimtune("eval", *model, *adapter_args, "--data", TRAIN["data"], "--seqlen",
                   str(e["seqlen"]), "--max-tokens", str(e["max_tokens"]), "--batch-size",
                   str(e["batch_size"]), "--json")
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["dylora", "lora"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--work", type=Path, default=Path(__file__).with_name("results")
                    / "adapter_ranks_work")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the stored results")
    args = ap.parse_args()
    bad = [b for b in args.ranks if not 1 <= b <= TRAIN["r"]]
    if bad:
        ap.error(f"--ranks {bad}: every rank must be in [1, {TRAIN['r']}]")
    unknown = [m for m in args.methods if m not in LR]
    if unknown:
        ap.error(f"no learning rate for {unknown} in bench_adapt_quality.LR")
    settings = {"train": TRAIN, "eval": EVAL}
    same = json.dumps(settings, sort_keys=True)
    done = {(r["method"], r["lr"], r["rank"]) for r in read_rows(args.results)
            if json.dumps(r["settings"], sort_keys=True) == same}
    print(f"# {os.path.basename(sys.executable)} {' '.join(sys.argv)}  (settings {same}; load "
          f"average {os.getloadavg()[0]:.2f})", flush=True)
    jobs = [("none", None, None)] + [(m, LR[m], b) for m in args.methods for b in args.ranks]
    for method, lr, b in ([] if args.table else jobs):
        if (method, lr, b) in done:
            continue
        began = time.perf_counter()
        if method == "none":
            ppl = perplexity()
        else:
            out = args.work / method
            train(method, lr, out)
            ppl = perplexity("--adapter", str(out), "--adapter-rank", str(b))
        append_row(args.results, {"method": method, "lr": lr, "rank": b, "ppl_austen": ppl,
                                  "settings": settings})
        print(f"  {method} rank {b}: {ppl:.2f} ({time.perf_counter() - began:.0f} s)",
              file=sys.stderr, flush=True)
    rows = [r for r in read_rows(args.results)
            if json.dumps(r["settings"], sort_keys=True) == same]
    base = [r["ppl_austen"] for r in rows if r["method"] == "none"]
    print(f"Austen-test perplexity (base model: {base[-1]:.2f})" if base else "")
    print("| rank b | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for b in args.ranks:
        cells = []
        for m in args.methods:
            found = [r["ppl_austen"] for r in rows if r["method"] == m and r["rank"] == b]
            cells.append(f"{found[-1]:.2f}" if found else "-")
        print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
