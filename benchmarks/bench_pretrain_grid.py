"""Pretraining a small Llama from scratch on PTB with each training method (issue #15's grid).

Every row is one ``slimtune pretrain`` process (so its peak RSS is its own) with the same model
(--hidden 384, --layers 6, --heads 6: 29.5M parameters, 18.9M of them the tied 49,152 x 384
embedding of SmolLM2's tokenizer), data (PTB train, random windows of --seqlen 256 tokens, the
same windows in the same order for every row), token budget (--tokens), global batch (--batch 4
x 256 tokens), seed 0, linear warmup over the first 10% of the steps then cosine decay to 10%
of the peak lr, gradient norm clipped to 1.0, weight decay 0. Then perplexity on the first
--eval-tokens tokens of PTB valid and PTB test (windows of 256).

Rows (``METHODS``): ``adamw`` (full rank), ``galore`` and ``fira`` (rank = hidden / 4,
update_proj_gap 200, scale 0.25, all linears), ``sltrain`` (W = s·BA + S, r = hidden / 4,
density 0.03, no dense weight), ``lora`` (a frozen random-init base + s·BA, r = hidden / 4:
the GaLore paper's "LoRA" pretraining baseline; merged into the saved model), ``sst`` (U diag(σ)
Vᵀ of the random init, r = hidden / 4 singular-vector pairs sampled per round). Each row's lr is
in ``METHODS`` with its source; none was tuned here.

Columns: trainable parameters, optimiser-state MB (every tensor of the optimiser's state_dict at
the end), peak RSS MB of the process, median step seconds over the run, valid / test
perplexity, final training loss. ``--time-rounds K`` adds a timing phase: K rounds in which
every method runs --time-steps steps in its own process (evaluating one window only), the order
rotated each round; the median of each run's steps after the first two, then the median over
rounds (alternating, because these machines are noisy: compare ratios, not absolute seconds).

Rows are appended to a JSON-lines file; a row already there with the same method and settings
is skipped, so an interrupted grid resumes.

    .venv/bin/python benchmarks/bench_pretrain_grid.py [--methods adamw galore ...]
        [--tokens 204800] [--batch 4] [--seqlen 256] [--eval-tokens 65536]
        [--time-rounds 2] [--time-steps 8] [--results FILE] [--table]
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

from bench_common import ROOT, append_row, cpu_model, git_commit, read_rows

DEFAULT_RESULTS = Path(__file__).with_name("results") / "pretrain_grid.jsonl"
HIDDEN, LAYERS, HEADS = 384, 6, 6
RANK = HIDDEN // 4

# method -> (peak lr, its source, extra `slimtune pretrain` arguments)
METHODS = {
    "adamw": (1e-3, "GaLore paper, full-rank LLaMA-60M", []),
    "galore": (1e-2, "GaLore paper, LLaMA-60M (lr 0.01, scale 0.25, T 200)",
               ["--optimizer", "galore", "-O", f"rank={RANK}", "-O", "update_proj_gap=200",
                "-O", "scale=0.25"]),
    "fira": (1e-2, "as GaLore (Fira keeps GaLore's settings)",
             ["--optimizer", "fira", "-O", f"rank={RANK}", "-O", "update_proj_gap=200",
              "-O", "scale=0.25"]),
    "sltrain": (3e-3, "SLTrain paper, LLaMA-60M (lr 0.003, r 128 of 512, δ 0.03)",
                ["--method", "sltrain", "--rank", str(RANK), "-p", "density=0.03"]),
    "lora": (1e-2, "no source for pretraining LoRA; GaLore's lr for its low-rank baselines",
             ["--method", "lora", "--rank", str(RANK)]),
    "sst": (1e-3, "full-rank lr (SST trains the singular values of a full SVD)",
            ["--method", "sst", "--rank", str(RANK)]),
}


def settings(args) -> dict:
    return {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "tokens": args.tokens,
            "batch": args.batch, "seqlen": args.seqlen, "eval_tokens": args.eval_tokens}


def pretrain(method: str, tokens: int, args, out: Path, threads: int,
             eval_tokens: int | None = None) -> dict:
    lr, _, extra = METHODS[method]
    cmd = [str(ROOT / ".venv" / "bin" / "slimtune"), "-q", "pretrain", "--hidden", str(HIDDEN),
           "--layers", str(LAYERS), "--heads", str(HEADS), "--data", "ptb", "--tokens",
           str(tokens), "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--lr",
           str(lr), "--eval-tokens", str(eval_tokens or args.eval_tokens), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "history.json").read_text())


def quality_row(method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        history = pretrain(method, args.tokens, args, Path(tmp) / "out", args.threads)
    final = history["final_eval"]
    return {"method": method, "lr": METHODS[method][0], "lr_source": METHODS[method][1],
            "settings": settings(args), "steps": len(history["steps"]),
            "parameters": history["parameters"],
            "trainable_parameters": history["trainable_parameters"],
            "optimizer_state_mb": history["optimizer_state_mb"],
            "peak_rss_mb": history["peak_rss_mb"], "seconds_per_step":
            history["seconds_per_step"], "valid_perplexity": final["valid_perplexity"],
            "test_perplexity": final["perplexity"], "final_loss": history["steps"][-1]["loss"],
            "losses": [s["loss"] for s in history["steps"]], "threads": args.threads,
            "commit": git_commit(), "cpu": cpu_model()}


def timing(methods: list[str], args) -> dict:
    per_method = {m: [] for m in methods}
    tokens = args.time_steps * args.batch * args.seqlen
    for rnd in range(args.time_rounds):
        order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for method in order:
            with tempfile.TemporaryDirectory() as tmp:
                history = pretrain(method, tokens, args, Path(tmp) / "out", args.threads,
                                   eval_tokens=args.seqlen)  # timing: one window suffices
            seconds = [s["seconds"] for s in history["steps"][2:]]
            per_method[method].append(statistics.median(seconds))
        print(f"timing round {rnd + 1}: " + ", ".join(
            f"{m} {per_method[m][-1]:.2f} s" for m in methods), file=sys.stderr, flush=True)
    return {m: statistics.median(v) for m, v in per_method.items()}


def print_table(rows: list[dict], timed: dict | None) -> None:
    print(f"| method | lr | trainable | optimiser state MB | peak RSS MB | s/step (run) | "
          f"{'s/step (alternating) | ' if timed else ''}PTB valid ppl | PTB test ppl | "
          f"final loss |")
    print("|---|---|---|---|---|---|" + ("---|" if timed else "") + "---|---|---|")
    for r in rows:
        alt = f" {timed[r['method']]:.2f} |" if timed and r["method"] in timed else \
            (" – |" if timed else "")
        print(f"| {r['method']} | {r['lr']:g} | {r['trainable_parameters'] / 1e6:.2f}M | "
              f"{r['optimizer_state_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['seconds_per_step']:.2f} |{alt} {r['valid_perplexity']:.1f} | "
              f"{r['test_perplexity']:.1f} | {r['final_loss']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tokens", type=int, default=204800)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-rounds", type=int, default=0)
    ap.add_argument("--time-steps", type=int, default=8)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the stored rows")
    args = ap.parse_args()
    print(f"# pretraining grid: llama {HIDDEN}x{LAYERS} ({HEADS} heads), PTB, {args.tokens} "
          f"tokens in steps of {args.batch}x{args.seqlen}, {args.threads} threads, "
          f"{cpu_model()}, commit {git_commit()}", flush=True)
    here = settings(args)
    if not args.table:
        for method in args.methods:
            if any(r["method"] == method and r["settings"] == here
                   for r in read_rows(args.results)):
                print(f"{method}: stored, skipped", file=sys.stderr)
                continue
            row = quality_row(method, args)
            append_row(args.results, row)
            print(f"{method}: valid ppl {row['valid_perplexity']:.1f}, "
                  f"{row['seconds_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    timed = timing(args.methods, args) if args.time_rounds and not args.table else None
    if timed:
        append_row(args.results, {"timing": timed, "settings": here, "rounds":
                                  args.time_rounds, "steps": args.time_steps,
                                  "commit": git_commit(), "cpu": cpu_model()})
    stored = read_rows(args.results)
    rows = [r for r in stored if r.get("settings") == here and "method" in r
            and r["method"] in args.methods]
    if timed is None:
        timings = [r["timing"] for r in stored if "timing" in r and r["settings"] == here]
        timed = timings[-1] if timings else None
    print_table(rows, timed)


if __name__ == "__main__":
    main()
