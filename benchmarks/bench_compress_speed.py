"""Forward speed of low-rank-compressed SmolLM2-135M against the dense model, alternating.

Speed depends only on the shapes, not on how the factors were computed, so every method with
uniform allocation at a kept ratio has the same speed. For each ratio this builds the compressed
structure (all 210 projections → ``FactoredLinear`` with no base and ``LowRank`` of rank
``rank_for_ratio(out, in, ratio)``, factors from the truncated SVD of the real weights), then times
one forward of ``--windows`` PTB-test windows of 512 tokens for the dense model and each compressed
model in turn, ``--repeats`` rounds (after one warm-up round), alternating so that drift on a noisy
machine hits all models alike, and reports the median tokens/s and its ratio to the dense median.

    .venv/bin/python benchmarks/bench_compress_speed.py [--ratios 0.9 0.8 0.6] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from slimtune.compress.lowrank.steps import factored_linear
from slimtune.data import load_text
from slimtune.evaluate import parameter_count, tokenize_text
from slimtune.models import load_model
from slimtune.targets import replace_linears
from slimtune.weights.svd import rank_for_ratio, truncated_svd


def compressed(model, ratio: float):
    model = copy.deepcopy(model)

    def factor(name, linear):
        W = linear.weight.detach()
        k = rank_for_ratio(*W.shape, ratio)
        U, S, Vh = truncated_svd(W, k)
        return factored_linear(U, S, Vh, k, linear.bias, W.dtype, W.device)

    replace_linears(model, "all-linear", factor)
    return model.eval()


def forward_seconds(model, windows) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(windows, use_cache=False)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"# {os.path.basename(sys.executable)} {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
          f"{args.windows}×512 PTB-test tokens, {args.repeats} alternating rounds after 1 "
          f"warm-up, median; load average at start {os.getloadavg()[0]:.2f}")
    dense, tok = load_model("smollm2-135m")
    ids = tokenize_text(tok, load_text("ptb", "test"))
    windows = ids[: args.windows * 512].view(args.windows, 512)
    models = {"dense": dense, **{f"{r}": compressed(dense, r) for r in args.ratios}}
    times = {name: [] for name in models}
    for round_ in range(args.repeats + 1):
        for name, model in models.items():
            t = forward_seconds(model, windows)
            if round_:
                times[name].append(t)
    base = statistics.median(times["dense"])
    print("| kept ratio | params M | tok/s (median) | speed vs dense | min–max s |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        med = statistics.median(times[name])
        print(f"| {name} | {parameter_count(model) / 1e6:.1f} | {windows.numel() / med:.0f} | "
              f"{base / med:.2f} | {min(times[name]):.2f}–{max(times[name]):.2f} |")


if __name__ == "__main__":
    main()
