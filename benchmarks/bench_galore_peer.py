"""GaLore against galore-torch 1.0's ``GaLoreAdamW`` on SmolLM2-135M: optimiser step time and
optimiser-state memory, in the same process, the two steps alternating.

Setting: SmolLM2-135M in float32, every parameter trainable; the gradients of one real batch (4
random Austen-train windows of 128 tokens, seed 0) are computed once and given to both
optimisers at every step (the optimisers are what is timed, not the model). GaLore projects
every linear of the 30 blocks (``target: all-linear``: q/k/v/o/gate/up/down, 210 matrices,
71% of the parameters); rank --rank (128), update_proj_gap 200 (the paper's), scale 0.25, lr
1e-5, AdamW keys as galore-torch's defaults (betas 0.9/0.999, eps 1e-6, weight decay 0). Both
take an exact SVD of each projected gradient at their first step (the refresh) and project
afterwards; the embedding and norms get the plain AdamW step in both.

Printed: the refresh step's seconds (median over --refreshes alternating refresh rounds, each
rebuilding both optimisers), the median seconds of --steps steady steps (ours, theirs,
alternating, ratio ours/theirs), the optimiser state of the projected matrices in MB (ours:
moments + basis; theirs: moments + the projector's orthogonal matrix; torch AdamW's two moments
measured on the same matrices) with the ratio to AdamW's (target: ≤ 40%), the whole state, and
the largest relative difference of any parameter between the two after the same steps (they
implement the same update: it should be float32 rounding).

    PYTHONPATH=benchmarks/peers/.optim-pkgs .venv/bin/python benchmarks/bench_galore_peer.py
        [--rank 128] [--steps 20] [--refreshes 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench_common import cpu_model, git_commit


def state_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable in an optimiser state (tensors, containers, and the
    attributes of objects such as galore-torch's projector)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(state_bytes(v, seen) for v in vars(obj).values())
    return 0


def real_gradients(model, tokenizer) -> dict[str, torch.Tensor]:
    from slimtune.train.tasks import CausalLMTask

    task = CausalLMTask(tokenizer, "austen", seqlen=128, eval_tokens=128, seed=0)
    model.requires_grad_(True)
    task.loss(model, task.next_batch(4)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def give(model, grads) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()


def optimisers(base, rank: int):
    from galore_torch import GaLoreAdamW

    from slimtune.targets import match_targets
    from slimtune.train.optimizers import build

    ours_model, theirs_model = copy.deepcopy(base), copy.deepcopy(base)
    ours = build("galore", ours_model, rank=rank, update_proj_gap=200, scale=0.25, lr=1e-5)
    names = match_targets(theirs_model, "all-linear")
    projected = [theirs_model.get_submodule(n).weight for n in names]
    chosen = {id(p) for p in projected}
    others = [p for p in theirs_model.parameters() if id(p) not in chosen]
    theirs = GaLoreAdamW([{"params": others},
                          {"params": projected, "rank": rank, "update_proj_gap": 200,
                           "scale": 0.25, "proj_type": "std"}], lr=1e-5,
                         no_deprecation_warning=True)
    return (ours_model, ours), (theirs_model, theirs), names


def timed_step(model, optimizer, grads) -> float:
    give(model, grads)
    began = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - began
    optimizer.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--refreshes", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch  # noqa: F401  (imports bitsandbytes, which warns on CPU)
    from slimtune.models import load_model

    print(f"# galore vs galore-torch 1.0: SmolLM2-135M float32, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {cpu_model()}, commit {git_commit()}", flush=True)
    base, tokenizer = load_model("smollm2-135m")
    grads = real_gradients(base, tokenizer)

    refresh = {"ours": [], "theirs": []}
    for rnd in range(args.refreshes):
        (om, ours), (tm, theirs), names = optimisers(base, args.rank)
        pair = [("ours", om, ours), ("theirs", tm, theirs)]
        for who, model, opt in (pair if rnd % 2 == 0 else pair[::-1]):
            refresh[who].append(timed_step(model, opt, grads))
        print(f"refresh round {rnd + 1}: ours {refresh['ours'][-1]:.2f} s, theirs "
              f"{refresh['theirs'][-1]:.2f} s", file=sys.stderr, flush=True)
        if rnd < args.refreshes - 1:
            del om, ours, tm, theirs, pair
    steady = {"ours": [], "theirs": []}
    for step in range(args.steps):
        pair = [("ours", om, ours), ("theirs", tm, theirs)]
        for who, model, opt in (pair if step % 2 == 0 else pair[::-1]):
            steady[who].append(timed_step(model, opt, grads))
    diff = max(float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())
               for a, b in zip(om.parameters(), tm.parameters()))

    projected_ids = {id(om.get_submodule(n).weight) for n in names}
    ours_projected = sum(state_bytes(s) for p, s in ours.state.items() if id(p) in projected_ids)
    theirs_ids = {id(tm.get_submodule(n).weight) for n in names}
    theirs_projected = sum(state_bytes(s) for p, s in theirs.state.items()
                           if id(p) in theirs_ids)
    adamw = torch.optim.AdamW([om.get_submodule(n).weight for n in names], lr=1e-5)
    give(om, grads)
    adamw.step()
    adamw_projected = state_bytes(dict(adamw.state))
    result = {
        "rank": args.rank, "projected_matrices": len(names),
        "projected_parameters": sum(om.get_submodule(n).weight.numel() for n in names),
        "refresh_seconds": {k: statistics.median(v) for k, v in refresh.items()},
        "step_seconds": {k: statistics.median(v) for k, v in steady.items()},
        "projected_state_mb": {"ours": ours_projected / 2**20,
                               "theirs": theirs_projected / 2**20,
                               "adamw": adamw_projected / 2**20},
        "whole_state_mb": {"ours": state_bytes(dict(ours.state)) / 2**20,
                           "theirs": state_bytes(dict(theirs.state)) / 2**20},
        "max_relative_parameter_difference": diff,
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "commit": git_commit()}
    r = result
    print(f"refresh step (SVD of {len(names)} gradients): ours {r['refresh_seconds']['ours']:.2f}"
          f" s, galore-torch {r['refresh_seconds']['theirs']:.2f} s, ratio "
          f"{r['refresh_seconds']['ours'] / r['refresh_seconds']['theirs']:.2f}")
    print(f"steady step (median of {args.steps}): ours {r['step_seconds']['ours']:.3f} s, "
          f"galore-torch {r['step_seconds']['theirs']:.3f} s, ratio "
          f"{r['step_seconds']['ours'] / r['step_seconds']['theirs']:.2f}")
    mb = r["projected_state_mb"]
    print(f"state of the projected matrices: ours {mb['ours']:.1f} MB "
          f"({mb['ours'] / mb['adamw']:.1%} of AdamW's {mb['adamw']:.1f} MB), galore-torch "
          f"{mb['theirs']:.1f} MB ({mb['theirs'] / mb['adamw']:.1%})")
    print(f"whole optimiser state: ours {r['whole_state_mb']['ours']:.1f} MB, galore-torch "
          f"{r['whole_state_mb']['theirs']:.1f} MB; largest parameter difference after "
          f"{args.refreshes and 1 + args.steps} steps: {diff:.2e} (relative)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
