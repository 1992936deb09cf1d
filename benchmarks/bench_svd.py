"""Acceptance benchmark: randomized_svd vs exact SVD on every decoder linear weight of SmolLM2-135M.

For each of the 210 matrices (q, k, v, o, gate, up, down x 30 layers) at rank r:

- accuracy: relative excess Frobenius error ``err_rand / err_exact - 1`` where ``err_x`` is
  ``||W - U_r diag(S_r) Vh_r||_F`` (target: worst case <= 1%);
- speed: wall time of ``randomized_svd`` vs ``torch.linalg.svd(W, full_matrices=False)`` on the same
  matrix, in the same process, alternating which runs first per repeat; per-matrix minimum over
  ``--repeats`` runs (the least disturbed by other load), summed over matrices (target: >= 5x).
  The 1-minute load average is printed before and after: on a shared machine, compare runs only
  at similar load.

Run: ``.venv/bin/python benchmarks/bench_svd.py [--rank 16] [--oversample 10] [--n-iter 4]
[--repeats 3] [--threads N] [--json out.json]``. Exits 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from slimtune.models import load_model
from slimtune.weights.svd import randomized_svd

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--n-iter", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--max-excess", type=float, default=0.01, help="accuracy target (relative)")
    p.add_argument("--min-speedup", type=float, default=5.0, help="speed target (x)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def decoder_weights(model):
    """Yield (layer index, projection name, weight) for every decoder linear layer."""
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            yield index, name.split(".")[-1], layer.get_submodule(name).weight.detach().contiguous()


def frobenius_error(W, U, S, Vh, r):
    W_r = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
    return torch.linalg.matrix_norm(W.double() - W_r).item()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(W, args):
    exact_fn = lambda: torch.linalg.svd(W, full_matrices=False)  # noqa: E731
    rand_fn = lambda: randomized_svd(W, args.rank, args.oversample, args.n_iter, args.seed)  # noqa: E731
    exact_times, rand_times = [], []
    for rep in range(args.repeats):
        if rep % 2 == 0:
            t_exact, exact = timed(exact_fn)
            t_rand, rand = timed(rand_fn)
        else:
            t_rand, rand = timed(rand_fn)
            t_exact, exact = timed(exact_fn)
        exact_times.append(t_exact)
        rand_times.append(t_rand)
    err_exact = frobenius_error(W, *exact, args.rank)
    err_rand = frobenius_error(W, *rand, args.rank)
    return {"t_exact": min(exact_times), "t_rand": min(rand_times),
            "err_exact": err_exact, "err_rand": err_rand, "excess": err_rand / err_exact - 1}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    weights = list(decoder_weights(model))

    print("bench_svd: randomized_svd vs torch.linalg.svd(full_matrices=False)")
    print(f"  command : {' '.join([sys.executable, *sys.argv])}")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads, python "
          f"{platform.python_version()}, {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"  model {args.model}: {len(weights)} matrices, float32, CPU; rank={args.rank} "
          f"oversample={args.oversample} n_iter={args.n_iter} seed={args.seed} repeats={args.repeats}")
    print(f"  timing: min over repeats per matrix; load average at start {os.getloadavg()[0]:.2f}")

    for shape in {tuple(W.shape) for _, _, W in weights}:  # warm-up: one call per shape, untimed
        W = next(W for _, _, W in weights if tuple(W.shape) == shape)
        torch.linalg.svd(W, full_matrices=False)
        randomized_svd(W, args.rank, args.oversample, args.n_iter, args.seed)

    rows = []
    for layer, proj, W in weights:
        rows.append({"layer": layer, "proj": proj, "shape": list(W.shape), **measure(W, args)})

    print(f"\n{'proj':<10}{'shape':>12}{'n':>4}{'exact ms':>10}{'rand ms':>9}{'speedup':>9}"
          f"{'mean excess':>13}{'worst excess':>14}")
    for proj in [p.split(".")[-1] for p in PROJECTIONS]:
        group = [r for r in rows if r["proj"] == proj]
        t_e = sum(r["t_exact"] for r in group)
        t_r = sum(r["t_rand"] for r in group)
        shape = "x".join(map(str, group[0]["shape"]))
        print(f"{proj:<10}{shape:>12}{len(group):>4}{1e3 * t_e / len(group):>10.2f}"
              f"{1e3 * t_r / len(group):>9.2f}{t_e / t_r:>8.1f}x"
              f"{statistics.mean(r['excess'] for r in group):>13.2e}"
              f"{max(r['excess'] for r in group):>14.2e}")

    total_exact = sum(r["t_exact"] for r in rows)
    total_rand = sum(r["t_rand"] for r in rows)
    speedup = total_exact / total_rand
    worst = max(rows, key=lambda r: r["excess"])
    mean_excess = statistics.mean(r["excess"] for r in rows)
    accuracy_ok = worst["excess"] <= args.max_excess
    speed_ok = speedup >= args.min_speedup
    print(f"\ntotal time: exact {total_exact:.3f} s, randomized {total_rand:.3f} s -> "
          f"{speedup:.1f}x faster (target >= {args.min_speedup:g}x: {'PASS' if speed_ok else 'FAIL'})")
    print(f"relative excess Frobenius error: mean {mean_excess:.2e}, worst {worst['excess']:.2e} "
          f"(layer {worst['layer']} {worst['proj']}) (target <= {args.max_excess:g}: "
          f"{'PASS' if accuracy_ok else 'FAIL'})")

    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        summary = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "argv": sys.argv, "params": vars(args), "total_exact_s": total_exact,
                   "total_rand_s": total_rand, "speedup": speedup, "mean_excess": mean_excess,
                   "worst_excess": worst["excess"], "rows": rows}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if accuracy_ok and speed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
