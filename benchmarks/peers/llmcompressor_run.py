"""Compress a model with llm-compressor (the GPTQ / SparseGPT / Wanda peer) and score it.

Runs INSIDE the peer venv built by ``build_llmcompressor.sh`` (no slimtune there). Reads the
calibration windows and test token ids that ``export_tokens.py`` wrote from the slimtune venv, so
calibration and scoring use exactly slimtune's tokens. Steps:

1. Load ``--model`` (a Hugging Face directory) in float32 with ``AutoModelForCausalLM``.
2. Build the recipe for ``--scheme``: ``GPTQModifier`` with an explicit ``config_groups`` scheme
   (int, symmetric, per-channel or per-group weights, no activation quantisation) on every
   ``Linear`` except ``lm_head`` and its 0.14 defaults (block 128, dampening 0.01, act-order
   "static"); or ``SparseGPTModifier`` / ``WandaPruningModifier`` at sparsity 0.5 (unstructured or
   ``mask_structure="2:4"``) on the same modules. ``dense`` skips compression (the reference).
3. ``oneshot(model=, tokenizer=, dataset=Dataset{input_ids, attention_mask=1}, recipe=,
   num_calibration_samples=n, max_seq_length=seqlen, shuffle_calibration_samples=False)``;
   only this call is timed (``compress_seconds``). 0.14 infers the sequential pipeline.
4. Check what the model holds: quantised weights must already lie on their grid
   (``fake_quantize(W) == W``; the forward keeps llm-compressor's fake-quant enabled, which is
   what a reloaded compressed-tensors checkpoint computes); pruned weights must be 50% zeros
   (2:4: two zeros in every group of four).
5. Perplexity with slimtune's protocol (``slimtune.evaluate.perplexity``, replicated here): the
   first ``--eval-tokens`` tokens cut into non-overlapping ``--eval-seqlen`` windows (tail
   dropped), each scored alone, every next-token prediction in a window counts, the float32
   per-window NLL sums accumulated in float64, ppl = exp(sum / (windows·(seqlen-1))).
6. Write ``--out`` JSON (versions, settings, timings, peak RSS, ppl per eval set) and, with
   ``--save``, the model as llm-compressor writes it (``save_pretrained(save_compressed=True)``),
   plus its size on disk.

Example (from the repo root)::

    benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \\
        --model ~/.cache/slimtune/models/smollm2-135m --windows out/peers/windows.safetensors \\
        --eval out/peers/eval.safetensors --scheme gptq-w4-channel --threads 1 --out gptq.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# scheme -> (kind, settings)
SCHEMES = {
    "dense": ("dense", {}),
    "gptq-w4-channel": ("gptq", {"num_bits": 4, "strategy": "channel", "group_size": None}),
    "gptq-w3-g64": ("gptq", {"num_bits": 3, "strategy": "group", "group_size": 64}),
    "gptq-w4-g32": ("gptq", {"num_bits": 4, "strategy": "group", "group_size": 32}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5, "mask_structure": "0:0"}),
    "sparsegpt-2:4": ("sparsegpt", {"sparsity": 0.5, "mask_structure": "2:4"}),
    "wanda-50": ("wanda", {"sparsity": 0.5, "mask_structure": "0:0"}),
}
TARGETS = ["Linear"]
GPTQ_IGNORE = ["lm_head"]
PRUNE_IGNORE = ["re:.*lm_head"]  # the spelling the pruning modifiers' own docs use


def build_recipe(scheme: str, symmetric: bool = True):
    kind, cfg = SCHEMES[scheme]
    if kind == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = QuantizationArgs(num_bits=cfg["num_bits"], type="int", symmetric=symmetric,
                                   strategy=cfg["strategy"], group_size=cfg["group_size"])
        group = QuantizationScheme(targets=TARGETS, weights=weights)
        return GPTQModifier(config_groups={"group_0": group}, targets=TARGETS, ignore=GPTQ_IGNORE)
    if kind == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=cfg["sparsity"], mask_structure=cfg["mask_structure"],
                                 targets=TARGETS, ignore=PRUNE_IGNORE)
    if kind == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=cfg["sparsity"], mask_structure=cfg["mask_structure"],
                                    targets=TARGETS, ignore=PRUNE_IGNORE)
    return None


def modifier_settings(modifier) -> dict:
    """The modifier's own settings (defaults included), JSON-ready."""
    if modifier is None:
        return {}
    keep = ("block_size", "dampening_frac", "actorder", "sparsity", "mask_structure",
            "targets", "ignore", "sparsity_profile", "preserve_sparsity_mask")
    dumped = modifier.model_dump(mode="json")
    return {"class": type(modifier).__name__, **{k: dumped[k] for k in keep if k in dumped}}


def decoder_linears(model) -> dict:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}


@torch.no_grad()
def check_compressed(model, kind: str, mask_structure: str = "0:0") -> dict:
    """What the model holds after oneshot: quantised weights on their grid, or the sparsity."""
    linears = decoder_linears(model)
    if kind == "gptq":
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        done = {n: m for n, m in linears.items() if hasattr(m, "weight_scale")}
        worst, levels = 0.0, 0
        for m in done.values():
            args = m.quantization_scheme.weights
            q = fake_quantize(m.weight, m.weight_scale, getattr(m, "weight_zero_point", None), args)
            worst = max(worst, (q - m.weight).abs().max().item())
            scale = m.weight_scale.repeat_interleave(m.weight.shape[1] // m.weight_scale.shape[1], 1)
            levels = max(levels, int(torch.unique(torch.round(m.weight / scale)).numel()))
        first = next(iter(done.values()))
        return {"quantized_modules": len(done), "decoder_linears": len(linears),
                "weights_on_grid_max_abs_dev": worst, "max_integer_levels": levels,
                "weight_dtype": str(first.weight.dtype), "status": str(first.quantization_status),
                "scheme": first.quantization_scheme.model_dump(mode="json")}
    if kind in ("sparsegpt", "wanda"):
        zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
        total = sum(m.weight.numel() for m in linears.values())
        out = {"decoder_linears": len(linears), "zero_fraction": zeros / total}
        if mask_structure == "2:4":
            ok = all(bool(((m.weight.reshape(-1, 4) == 0).sum(1) >= 2).all())
                     for m in linears.values())
            out["all_groups_2of4_zero"] = ok
        return out
    return {}


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 512, max_tokens: int | None = None):
    """slimtune.evaluate.perplexity's protocol and arithmetic (batch size 1)."""
    ids = token_ids if max_tokens is None else token_ids[:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"need at least {seqlen} tokens, got {ids.numel()}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    targets = torch.roll(windows, shifts=-1, dims=1)
    targets[:, -1] = -100
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    for i in range(n_windows):
        logits = model(input_ids=windows[i:i + 1], use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets[i:i + 1].reshape(-1),
                               ignore_index=-100, reduction="sum")
        nll_sum += loss.to(torch.float64)
    seconds = time.perf_counter() - start
    nll = nll_sum.item() / (n_windows * (seqlen - 1))
    return {"perplexity": math.exp(nll), "nll": nll, "windows": n_windows, "seqlen": seqlen,
            "seconds": seconds}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dir_mb(path: Path, suffixes: tuple[str, ...] | None = None) -> float:
    files = [f for f in path.rglob("*") if f.is_file() and (suffixes is None or f.suffix in suffixes)]
    return sum(f.stat().st_size for f in files) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    ap.add_argument("--windows", type=Path, required=True, help="safetensors: input_ids [n, seqlen]")
    ap.add_argument("--eval", type=Path, required=True, help="safetensors: ptb (austen) 1-D ids")
    ap.add_argument("--scheme", choices=list(SCHEMES), required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save", type=Path, help="write the compressed model here")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--asymmetric", action="store_true", help="GPTQ: asymmetric (default symmetric)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"run: {command}", flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = load_file(str(args.windows))["input_ids"]
    if windows.ndim != 2 or windows.dtype != torch.int64:
        raise SystemExit(f"{args.windows}: input_ids must be int64 [n, seqlen], got "
                         f"{windows.dtype} {tuple(windows.shape)}")
    n, seqlen = windows.shape
    eval_ids = load_file(str(args.eval))

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kind, cfg = SCHEMES[args.scheme]
    modifier = build_recipe(args.scheme, symmetric=not args.asymmetric)

    result = {
        "tool": "llmcompressor", "scheme": args.scheme, "model": str(args.model),
        "windows_file": str(args.windows), "eval_file": str(args.eval), "n": n, "seqlen": seqlen,
        "threads": args.threads, "command": command, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "compressed-tensors",
                                             "llmcompressor", "datasets")},
        "modifier": modifier_settings(modifier),
        "symmetric": not args.asymmetric if kind == "gptq" else None,
    }
    compress_seconds = 0.0
    if modifier is not None:
        from datasets import Dataset
        from llmcompressor import oneshot

        dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                     "attention_mask": torch.ones_like(windows).tolist()})
        oneshot_kwargs = dict(recipe=modifier, num_calibration_samples=n, max_seq_length=seqlen,
                              shuffle_calibration_samples=False, batch_size=1)
        result["oneshot_kwargs"] = {k: v for k, v in oneshot_kwargs.items() if k != "recipe"}
        start = time.perf_counter()
        model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, **oneshot_kwargs)
        compress_seconds = time.perf_counter() - start
        print(f"oneshot: {compress_seconds:.1f} s", flush=True)
    result["compress_seconds"] = compress_seconds
    result["check"] = check_compressed(model, kind, cfg.get("mask_structure", "0:0"))
    print(f"check: {json.dumps(result['check'])}", flush=True)

    result["eval_seqlen"], result["eval_tokens"] = args.eval_seqlen, args.eval_tokens
    result["ppl"], result["nll"], result["eval_seconds"] = {}, {}, {}
    for name in sorted(eval_ids, key=lambda k: (k != "ptb", k)):  # ptb first
        ids = eval_ids[name]
        res = perplexity(model, ids.to(torch.long), args.eval_seqlen, args.eval_tokens)
        result["ppl"][name], result["nll"][name] = res["perplexity"], res["nll"]
        result["eval_seconds"][name] = res["seconds"]
        print(f"perplexity {name}: {res['perplexity']:.6f} (nll {res['nll']:.8f}, "
              f"{res['windows']}×{res['seqlen']}, {res['seconds']:.1f} s)", flush=True)

    if args.save is not None:
        start = time.perf_counter()
        model.save_pretrained(args.save, save_compressed=True)
        tokenizer.save_pretrained(args.save)
        result["save"] = {"dir": str(args.save), "seconds": time.perf_counter() - start,
                          "disk_mb": dir_mb(args.save),
                          "weights_mb": dir_mb(args.save, (".safetensors", ".bin"))}
        print(f"saved {args.save}: {result['save']['disk_mb']:.1f} MB", flush=True)
    result["peak_rss_mb"] = peak_rss_mb()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.scheme}: compress {compress_seconds:.1f} s, ppl "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["ppl"].items())
          + f", peak RSS {result['peak_rss_mb']:.0f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
