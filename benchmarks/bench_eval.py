"""Overhead of slimtune.evaluate.perplexity against a raw forward loop on the same windows.

On SmolLM2-135M and the first N×seqlen tokens of the PTB test split, alternately times

- ``perplexity(model, ids, seqlen, max_tokens=N*seqlen, progress=False)`` (forward + loss), and
- a raw loop ``for w in windows: model(w[None], use_cache=False)`` under ``torch.inference_mode``
  (the same forward call perplexity makes, no loss),

``--repeats`` times each (which one runs first alternates) after one untimed warm-up window, and reports the median tokens/s of each
and their ratio (target: perplexity >= 0.9 × raw).

    .venv/bin/python benchmarks/bench_eval.py [--windows 8] [--seqlen 512] [--repeats 6] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from slimtune.data import load_text
from slimtune.evaluate import perplexity, tokenize_text
from slimtune.models import load_model


def raw_forward_tokens_per_s(model, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            model(window[None], use_cache=False)
    return windows.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=6, help="timed runs of each, alternating order")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    model, tokenizer = load_model(args.model)
    ids = tokenize_text(tokenizer, load_text("ptb", "test"))
    n_tokens = args.windows * args.seqlen
    windows = ids[:n_tokens].view(args.windows, args.seqlen)
    print(f"model {args.model}, PTB test: {args.windows} windows × {args.seqlen} = {n_tokens} tokens")

    raw_forward_tokens_per_s(model, windows[:1])  # warm-up
    ours, raw = [], []
    for repeat in range(args.repeats):
        if repeat % 2:  # alternate which goes first, so drift does not favour one
            raw.append(raw_forward_tokens_per_s(model, windows))
        result = perplexity(model, ids, seqlen=args.seqlen, max_tokens=n_tokens, progress=False)
        ours.append(result["tokens_per_s"])
        if not repeat % 2:
            raw.append(raw_forward_tokens_per_s(model, windows))
        print(f"  run {repeat + 1}: perplexity() {ours[-1]:7.1f} tok/s   raw forward {raw[-1]:7.1f} tok/s"
              f"   (ppl {result['perplexity']:.3f})", flush=True)
    ours_median, raw_median = statistics.median(ours), statistics.median(raw)
    ratio = ours_median / raw_median
    print(f"median tokens/s: perplexity() {ours_median:.1f}, raw forward {raw_median:.1f}, "
          f"ratio {ratio:.3f} (target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
