"""Time of one training step with LoRA and DoRA on SmolLM2-135M: slimtune against PEFT.

A step is forward + causal-LM cross-entropy + backward + ``torch.optim.AdamW`` step (lr 1e-4) +
``zero_grad(set_to_none=True)``, on the same batch every time (--batch windows of --seqlen tokens of
Austen train, seeded), float32, r=16, alpha=32, every projection of every block adapted:

- ``ours lora`` / ``ours dora``: ``slimtune.adapt.apply(model, "lora" | "dora", r=16, alpha=32)``
  (targets ``all-linear``: the 7 projections; the LM head is skipped);
- ``peft lora`` / ``peft dora``: ``peft.get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32,
  lora_dropout=0, target_modules=[q, k, v, o, gate, up, down]_proj, use_dora=False | True)``.

All four models live in one process (deep copies of one base); each gets --warmup untimed steps,
then --steps timed steps, ALTERNATING model by model within every step round, the order rotated
by one each round so that none is always first. Reported: median seconds per step, the ratios ours
/ PEFT (target <= 1.0) and DoRA / LoRA (the cost of the magnitude rescaling), and the first-step
loss of each model (LoRA and DoRA start as the base model, so all four must agree).

One JSON line per run is appended to --results; ``--table`` prints the stored runs.

    .venv/bin/python benchmarks/bench_adapt_step.py [--batch 4] [--seqlen 256] [--steps 10]
        [--warmup 2] [--methods lora dora] [--threads N] [--layers N (smoke tests)]
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

DEFAULT_RESULTS = Path(__file__).with_name("results") / "adapt_step.jsonl"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def build(base, side: str, method: str, args):
    """``(model, optimizer)`` for ``side`` (ours | peft) and ``method`` (lora | dora)."""
    model = copy.deepcopy(base)
    if side == "ours":
        from slimtune import adapt

        model = adapt.apply(model, method, r=args.rank, alpha=args.alpha, progress=False)
    else:
        import peft

        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                 target_modules=PROJECTIONS, use_dora=method == "dora")
        model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=LR), sum(p.numel() for p in params)


def step(model, optimizer, ids) -> tuple[float, float]:
    """One optimiser step; returns (seconds, loss)."""
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def run(args) -> dict:
    from slimtune.models import load_model
    from slimtune.calib import calibration_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tok = load_model("smollm2-135m")
    if args.layers:
        first_blocks(base, args.layers)
    ids = calibration_windows(tok, "austen", "train", n=args.batch, seqlen=args.seqlen,
                              seed=args.seed)
    models = {}
    for method in args.methods:
        for side in ("ours", "peft"):
            models[f"{side} {method}"] = build(base, side, method, args)
    del base
    load_start = os.getloadavg()[0]
    print(f"# {os.path.basename(sys.executable)} {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, python "
          f"{platform.python_version()}, load average {load_start:.2f}; SmolLM2-135M float32 "
          f"({args.layers or 30} blocks), batch {args.batch}×{args.seqlen} Austen-train tokens, "
          f"r={args.rank}, alpha={args.alpha}, AdamW lr {LR}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per model, alternating", flush=True)

    names = list(models)

    def run_step(name: str, number: int) -> tuple[float, float]:
        model, optimizer, _ = models[name]
        return step(model, optimizer, ids)

    times, first_loss = alternate(names, args.warmup, args.steps, run_step)
    return {"settings": {"batch": args.batch, "seqlen": args.seqlen, "steps": args.steps,
                         "warmup": args.warmup, "rank": args.rank, "alpha": args.alpha,
                         "layers": args.layers or 30, "lr": LR, "seed": args.seed},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_start": load_start, "load_end": os.getloadavg()[0],
            "models": {n: {"median_s": statistics.median(times[n]), "times_s": times[n],
                           "first_loss": first_loss[n], "trainable": models[n][2]}
                       for n in names}}


def ratios(row: dict) -> list[str]:
    m = row["models"]
    methods = sorted({n.split()[1] for n in m}, key=["lora", "dora"].index)
    lines = [f"{meth}: ours / PEFT = "
             f"{m[f'ours {meth}']['median_s'] / m[f'peft {meth}']['median_s']:.2f} (target <= 1.0)"
             for meth in methods]
    if "dora" in methods and "lora" in methods:
        for side in ("ours", "peft"):
            lines.append(f"DoRA overhead ({side}): dora / lora = "
                         f"{m[f'{side} dora']['median_s'] / m[f'{side} lora']['median_s']:.2f}")
    return lines


def print_table(rows: list[dict]) -> None:
    cols = ("run", "model", "trainable", "median s/step", "ours / PEFT", "vs own LoRA",
            "first-step loss")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for i, row in enumerate(rows, 1):
        s, m = row["settings"], row["models"]
        label = (f"{i} ({s['batch']}×{s['seqlen']}, {s['steps']} steps, {s['layers']} blocks, "
                 f"{row['threads']} thr, load {row['load_start']:.1f})")
        for name, r in m.items():
            side, meth = name.split()
            other = m.get(f"{'peft' if side == 'ours' else 'ours'} {meth}")
            vs_peft = f"{r['median_s'] / other['median_s']:.2f}" if side == "ours" and other else ""
            lora = m.get(f"{side} lora")
            vs_lora = f"{r['median_s'] / lora['median_s']:.2f}" if meth != "lora" and lora else ""
            print(f"| {label} | {name} | {r['trainable']:,} | {r['median_s']:.3f} | {vs_peft} | "
                  f"{vs_lora} | {r['first_loss']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=["lora", "dora"], default=["lora", "dora"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=None,
                    help="only the first N blocks (smoke tests)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the table of stored results")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if not args.table:
        row = run(args)
        append_row(args.results, row)
        print("\n".join(ratios(row)))
    rows = read_rows(args.results)
    print_table(rows if args.table else rows[-1:])


if __name__ == "__main__":
    main()
