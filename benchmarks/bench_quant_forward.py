"""Speed of packed quantised layers (PyTorch's CPU weight-only kernels, or dequantising) against
the dense model, on real SmolLM2-135M.

All 210 projections (q, k, v, o, gate, up, down of the 30 blocks) become ``FactoredLinear`` layers
with a ``PackedQuantBase`` from RTN, one setting at a time: int4-g32-sym, int4-g64-asym and
int8-channel-sym (kernels where slimtune.layers.kernels applies them), int3-g64-asym (always
dequantises). Each is timed in one process against the dense model, the variants alternating
round by round (bench_common.alternate, order rotated):

  dense | quantised (kernels on) | quantised with SLIMTUNE_QUANT_KERNELS=0 (dequantising)

(a) batch-1 greedy generation (``generate``, ``do_sample=False``, min = max new tokens) from the
    first 16 tokens of PTB test: new tokens / s, the prompt's prefill included;
(b) forward of 512-token PTB-test windows (batch 1): tokens / s and the mean loss.
Medians over the timed rounds; ratio = tokens/s over the dense model's (higher is faster). The
dequantising variant is skipped where it would run the same code as the kernels variant (a path
that dequantises anyway); it generates fewer tokens (--deq-new-tokens), so the prompt's prefill
weighs more in its tokens/s. Generated tokens are compared with the dense and dequantising ones.

    .venv/bin/python benchmarks/bench_quant_forward.py [--rounds 3] [--new-tokens 64]
        [--deq-new-tokens 8] [--windows 2] [--seqlen 512] [--settings int4-g32-sym ...]
        [--dtype float32] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

from bench_common import alternate
from slimtune.data import load_text
from slimtune.layers import FactoredLinear, PackedQuantBase
from slimtune.layers.kernels import DEQUANTIZE, ENV_SWITCH, forward_path
from slimtune.models import load_model
from slimtune.targets import replace_linears
from slimtune.weights.quant import QuantSpec, round_to_nearest

SETTINGS = {"int4-g32-sym": QuantSpec(4, 32, True), "int4-g64-asym": QuantSpec(4, 64, False),
            "int8-channel-sym": QuantSpec(8, None, True), "int3-g64-asym": QuantSpec(3, 64, False)}
TARGETS = r"model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def kernels_off(off: bool):
    old = os.environ.get(ENV_SWITCH)
    if off:
        os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if off:
            if old is None:
                os.environ.pop(ENV_SWITCH, None)
            else:
                os.environ[ENV_SWITCH] = old


def quantised(dense, spec: QuantSpec):
    """A copy of ``dense`` with the 210 projections packed on ``spec``'s RTN grid."""
    model = copy.deepcopy(dense)

    def factory(name, linear):
        q, grid = round_to_nearest(linear.weight.detach().float(), spec)
        base = PackedQuantBase.from_integers(q, grid)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return FactoredLinear(linear.in_features, linear.out_features, base=base, bias=bias)

    layers = replace_linears(model, TARGETS, factory)
    assert len(layers) == 210, len(layers)
    return model.to(dense.dtype), layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--deq-new-tokens", type=int, default=8,
                    help="new tokens for the dequantising variant (slow)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, dtype {args.dtype}, {args.rounds} alternating "
          f"rounds, medians; generation {args.prompt_tokens}-token prompt + {args.new_tokens} new "
          f"tokens ({args.deq_new_tokens} dequantising); forward {args.windows} x {args.seqlen}",
          flush=True)
    dense, tok = load_model("smollm2-135m")
    dense = dense.to(DTYPES[args.dtype]).eval()
    ids = torch.tensor(tok(load_text("ptb", "test"))["input_ids"])
    prompt = ids[None, : args.prompt_tokens]
    windows = [ids[None, i * args.seqlen:(i + 1) * args.seqlen] for i in range(args.windows)]
    gen_kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False,
                  pad_token_id=tok.eos_token_id)
    rows = []

    def measure(models: dict, kind: str):
        def run(name, _round):
            model, off = models[name]
            with kernels_off(off), torch.inference_mode():
                start = time.perf_counter()
                if kind == "gen":
                    n = args.deq_new_tokens if off else args.new_tokens
                    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)
                    seconds = time.perf_counter() - start
                    return seconds, tuple(out[0, prompt.shape[1]:].tolist())
                loss = sum(float(model(w, labels=w).loss) for w in windows) / len(windows)
                return time.perf_counter() - start, loss
        times, first = alternate(list(models), 0, args.rounds, run)
        tokens = {n: (args.deq_new_tokens if models[n][1] else args.new_tokens) if kind == "gen"
                  else args.windows * args.seqlen for n in models}
        return {n: tokens[n] / statistics.median(times[n]) for n in models}, first

    for setting in args.settings:
        start = time.perf_counter()
        qmodel, layers = quantised(dense, SETTINGS[setting])
        base = next(iter(layers.values())).base
        seen = []  # the dtype reaching a base (FactoredLinear may cast its input)
        hook = base.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        with torch.inference_mode():
            for m in (dense, qmodel):  # warm-up; prepares the kernels' operands
                m(prompt[:, :1]), m(prompt)
        hook.remove()
        one = torch.zeros(1, 1, base.in_features, dtype=seen[0])
        window = torch.zeros(1, args.seqlen, base.in_features, dtype=seen[0])
        with torch.inference_mode():
            paths = forward_path(base, one), forward_path(base, window)
        dtype_in = str(seen[0]).replace("torch.", "")
        print(f"# {setting}: built and warmed in {time.perf_counter() - start:.1f} s; the bases "
              f"get {dtype_in} inputs; path for 1 token: {paths[0]}, for {args.seqlen}: "
              f"{paths[1]}", flush=True)
        for kind, path in (("gen", paths[0]), ("fwd", paths[1])):
            models = {"dense": (dense, False), "kernels": (qmodel, False)}
            if path != DEQUANTIZE:
                models["dequantize"] = (qmodel, True)
            rate, first = measure(models, kind)
            rows.append((setting, kind, path, rate, first))
        del qmodel, layers

    print(f"\n{'setting':<17} {'test':<14} {'path':<10} {'dense tok/s':>11} {'quant tok/s':>11} "
          f"{'ratio':>6} {'dequant tok/s':>13} {'ratio':>6} {'kern/deq':>8}  check")
    for setting, kind, path, rate, first in rows:
        d, k, q = rate["dense"], rate["kernels"], rate.get("dequantize")
        if kind == "gen":
            n = len(first["kernels"])
            same_dense = sum(a == b for a, b in zip(first["kernels"], first["dense"])) / n
            check = f"tokens = dense {same_dense:.0%}"
            if q is not None:
                m = len(first["dequantize"])
                check += f", = dequant {first['kernels'][:m] == first['dequantize']}"
        else:
            check = f"loss {first['kernels']:.4f} (dense {first['dense']:.4f}"
            check += ")" if q is None else f", dequant {first['dequantize']:.4f})"
        test = "generate" if kind == "gen" else f"forward {args.seqlen}"
        deq = (f"{q:>13.1f} {q / d:>6.3f} {k / q:>8.2f}" if q is not None
               else f"{'(same path)':>13} {'':>6} {'':>8}")
        print(f"{setting:<17} {test:<14} {path:<10} {d:>11.1f} {k:>11.1f} {k / d:>6.3f} {deq}  "
              f"{check}")
    print(f"# ratio: tokens/s over the dense model's in the same rounds; kern/deq: kernels over "
          f"dequantising; load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
