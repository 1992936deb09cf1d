"""Training-step time of every adapter method (and full fine-tuning) on SmolLM2-135M, in one run.

The quality grid (bench_adapt_quality.py) runs one method per subprocess, hours apart, so its
step-time column depends on what else the machine was doing. This script measures the step time
of every method in ONE process, ALTERNATING model by model within every round (order rotated by
one each round), so the ratios to LoRA measured here are comparable.

A step is what :func:`slimtune.train.train` does per optimiser step with ``grad_accum=1``: the
method's before-step hook (DyLoRA's rank, GGPO's perturbation, BA-LoRA's reference pass, SFT's
gradient window; before session 21 this script skipped it) + forward + causal-LM cross-entropy
(+ the method's own loss term, e.g. SORSA's orthonormal regulariser) + backward + the method's
after-backward hook + global-norm clipping to 1.0 + AdamW step + ``zero_grad`` + the method's
after-step hook, on the same --batch × --seqlen Austen-train windows every time. Adapters: r=16,
alpha=32, all 7 projections of every block, the method's default parameters (the quality grid's
settings); data-driven methods (corda, eva) are calibrated on --calib-n Austen-train windows (seed 0).
Set-up (SVD, calibration) is not timed. ``full`` trains every parameter.

Reported per method: trainable parameters, median seconds per step over --steps timed steps (after
--warmup), the ratio to LoRA's median, and the first-step loss (every method starts exactly as the
base model, so all must agree). One JSON line per run is appended to --results.

    .venv/bin/python benchmarks/bench_adapt_methods_step.py [--methods lora dora ... full]
        [--batch 4] [--seqlen 128] [--steps 5] [--warmup 2] [--calib-n 16] [--layers N]
        [--results FILE] [--table]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import alternate, append_row, first_blocks, read_rows

DEFAULT_RESULTS = Path(__file__).with_name("results") / "adapt_methods_step.jsonl"
def registered() -> list[str]:
    from slimtune.adapt import known_methods

    return [*known_methods(), "full"]
LR = 1e-4


def build(base, method: str, calib, args):
    """``(model, optimizer, params)`` for ``method`` on a deep copy of ``base``."""
    from slimtune import adapt

    model = copy.deepcopy(base)
    if method == "full":
        model.requires_grad_(True)
    else:
        needs = adapt.needs_calibration(method)
        adapt.apply(model, method, r=args.rank, alpha=args.alpha, calib=calib if needs else None,
                    progress=False)
        # the run's length, as the training loop records it (AdaLoRA's budget schedule reads it)
        adapt.method_state(model)["total_steps"] = args.warmup + args.steps
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=LR), params


def step(model, optimizer, params, ids, with_adapter: bool, number: int) -> tuple[float, float]:
    """One optimiser step as the training loop does it; returns (seconds, loss)."""
    from slimtune import adapt

    start = time.perf_counter()
    if with_adapter:  # DyLoRA's rank, GGPO's perturbation, BA-LoRA's reference pass, SFT's window
        adapt.before_step(model, number - 1)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    extra = adapt.extra_loss(model) if with_adapter else None
    (loss if extra is None else loss + extra).backward()
    if with_adapter:  # ``number`` counts from 1: the steps done once this one is
        adapt.after_backward(model, number - 1)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if with_adapter:
        adapt.after_step(model, number, optimizer)
    return time.perf_counter() - start, loss.item()


def run(args) -> dict:
    from slimtune.models import load_model
    from slimtune.calib import calibration_windows

    torch.manual_seed(args.seed)
    base, tok = load_model("smollm2-135m")
    if args.layers:
        first_blocks(base, args.layers)
    ids = calibration_windows(tok, "austen", "train", n=args.batch, seqlen=args.seqlen,
                              seed=args.seed)
    calib = calibration_windows(tok, "austen", "train", n=args.calib_n, seqlen=args.seqlen,
                                seed=args.seed)
    models = {}
    for method in args.methods:
        print(f"setting up {method}", file=sys.stderr, flush=True)
        models[method] = build(base, method, calib, args)
    del base
    load_start = os.getloadavg()[0]
    print(f"# {os.path.basename(sys.executable)} {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, python "
          f"{platform.python_version()}, load average {load_start:.2f}; SmolLM2-135M float32 "
          f"({args.layers or 30} blocks), batch {args.batch}×{args.seqlen} Austen-train tokens, "
          f"r={args.rank}, alpha={args.alpha}, AdamW lr {LR}, clip 1.0; {args.warmup} warm-up + "
          f"{args.steps} timed steps per model, alternating", flush=True)
    names = list(models)

    def run_step(name: str, number: int) -> tuple[float, float]:
        model, optimizer, params = models[name]
        return step(model, optimizer, params, ids, name != "full", number)

    times, first_loss = alternate(names, args.warmup, args.steps, run_step)
    return {"settings": {"batch": args.batch, "seqlen": args.seqlen, "steps": args.steps,
                         "warmup": args.warmup, "rank": args.rank, "alpha": args.alpha,
                         "calib_n": args.calib_n, "layers": args.layers or 30, "lr": LR,
                         "seed": args.seed},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_start": load_start, "load_end": os.getloadavg()[0],
            "models": {n: {"median_s": statistics.median(times[n]), "times_s": times[n],
                           "first_loss": first_loss[n],
                           "trainable": sum(p.numel() for p in models[n][2])} for n in names}}


def print_table(rows: list[dict]) -> None:
    cols = ("run", "method", "trainable", "median s/step", "vs lora", "first-step loss")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for i, row in enumerate(rows, 1):
        s, m = row["settings"], row["models"]
        label = (f"{i} ({s['batch']}×{s['seqlen']}, {s['steps']} steps, {s['layers']} blocks, "
                 f"load {row['load_start']:.1f}–{row['load_end']:.1f})")
        lora = m.get("lora")
        for name, r in m.items():
            vs = f"{r['median_s'] / lora['median_s']:.2f}" if lora else ""
            print(f"| {label} | {name} | {r['trainable']:,} | {r['median_s']:.3f} | {vs} | "
                  f"{r['first_loss']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=registered(), default=registered(),
                    help="every model is held in memory at once (~0.6 GB each): pass a subset "
                         "with lora in it on small machines")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None,
                    help="only the first N blocks (smoke tests)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the table of stored results")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.calib_n < 1:
        ap.error("--steps and --calib-n must be >= 1, --warmup >= 0")
    if not args.table:
        row = run(args)
        append_row(args.results, row)
    rows = read_rows(args.results)
    print_table(rows if args.table else rows[-1:])


if __name__ == "__main__":
    main()
