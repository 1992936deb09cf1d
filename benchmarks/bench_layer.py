"""Forward time of a FactoredLinear against nn.Linear on SmolLM2's real projection weights.

For each projection shape of SmolLM2-135M (layer 0's q/k/gate/down), on a batch of tokens:
  nn.Linear | FactoredLinear wrapping it (no low-rank) | + LoRA-style r=16 (unmerged) | merged
timed in one process, the variants interleaved, median over repeats. Prints the time ratio to
nn.Linear next to the flop ratio (m·n + r·(m+n)) / (m·n) for the unmerged low-rank layer.

    .venv/bin/python benchmarks/bench_layer.py [--tokens 512] [--rank 16] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from slimtune.layers import FactoredLinear, LowRank
from slimtune.models import load_model


def time_call(fn, x, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - start) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=5)
    args = ap.parse_args()
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, "
          f"rank {args.rank}, repeats {args.repeats} x {args.inner}, median reported")

    model, _ = load_model("smollm2-135m")
    block = model.model.layers[0]
    layers = {"q_proj": block.self_attn.q_proj, "k_proj": block.self_attn.k_proj,
              "gate_proj": block.mlp.gate_proj, "down_proj": block.mlp.down_proj}
    g = torch.Generator().manual_seed(0)
    header = (f"{'layer':<10} {'shape':>11} {'linear ms':>10} {'wrapped':>8} {'r=16':>8} "
              f"{'merged':>8} {'flop ratio':>10}")
    print(header)
    with torch.inference_mode():
        for name, linear in layers.items():
            m, n = linear.out_features, linear.in_features
            x = torch.randn(args.tokens, n, generator=g)
            wrapped = FactoredLinear.from_linear(copy.deepcopy(linear))
            lowrank = FactoredLinear.from_linear(copy.deepcopy(linear), lowrank=LowRank(
                torch.randn(args.rank, n, generator=g), torch.randn(m, args.rank, generator=g), 2.0))
            merged = copy.deepcopy(lowrank)
            merged.merge()
            variants = {"linear": linear, "wrapped": wrapped, "lowrank": lowrank, "merged": merged}
            for fn in variants.values():  # warm-up
                time_call(fn, x, 3)
            times = {k: [] for k in variants}
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    times[k].append(time_call(fn, x, args.inner))
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med["linear"]
            flops = (m * n + args.rank * (m + n)) / (m * n)
            print(f"{name:<10} {f'{m}x{n}':>11} {base * 1e3:>10.3f} {med['wrapped'] / base:>8.3f} "
                  f"{med['lowrank'] / base:>8.3f} {med['merged'] / base:>8.3f} {flops:>10.3f}")
    print("# columns after 'linear ms' are time ratios to nn.Linear (lower is faster)")


if __name__ == "__main__":
    main()
