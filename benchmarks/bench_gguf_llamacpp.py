"""Issue #13's llama.cpp cross-check: a slimtune GGUF scored by llama.cpp itself.

1. ``slimtune compress`` SmolLM2-135M with ``--recipe`` (default ``recipes/gptq_gguf.yaml``: GPTQ
   4-bit, symmetric groups of 32, float16 scales -- what Q4_0 blocks hold exactly) on ``--n``
   PTB-train windows, then ``slimtune export --format gguf --gguf-type`` (default q4_0).
2. Perplexity of the first ``--eval-tokens`` of PTB test and Austen test (windows of 512, each
   scored alone) by three readers: slimtune on the saved model, slimtune on the ``.gguf``
   (transformers' GGUF loader), and llama.cpp (``peers/llamacpp_ppl.py`` in the venv that
   ``peers/build_llamacpp.sh`` builds; no torch, no slimtune there) on the token ids slimtune's
   tokenizer made, written to ``.npy`` files. Target: llama.cpp within 1% of slimtune.
3. The baseline no other tool beats today: llama.cpp's own quantiser (``peers/llamacpp_quantize.py``,
   round-to-nearest, no calibration) on the dense model (slimtune's F32 GGUF of it, whose metadata
   and tokenizer equal the GGUF the model package ships) at the same types (Q4_0 projections,
   Q8_0 embedding), scored by llama.cpp on the same tokens.
4. Prints one table (and writes ``<out-dir>/result.json`` atomically); every command it ran is
   printed first.

    .venv/bin/python benchmarks/bench_gguf_llamacpp.py [--recipe R] [--n 16] [--eval-tokens 8192]
        [--gguf-type q4_0] [--threads 2] [--out-dir benchmarks/results/gguf_llamacpp]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SLIMTUNE = Path(sys.executable).with_name("slimtune")
LLAMA_PY = HERE / "peers" / ".venv-llamacpp" / "bin" / "python"
MODEL, SETS, SEQLEN = "smollm2-135m", ("ptb", "austen"), 512


def run(cmd: list[str], env: dict) -> str:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          env=env).stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def save_test_ids(tokenizer, folder: Path, n: int) -> None:
    """``<folder>/<set>.npy``: the first ``n`` test token ids of each set, by slimtune's tokenizer."""
    import numpy as np

    from slimtune.data import load_text
    from slimtune.evaluate import tokenize_text

    for data in SETS:
        np.save(folder / f"{data}.npy", tokenize_text(tokenizer, load_text(data, "test"))[:n].numpy())


def llamacpp_score(gguf: Path, ids: Path, threads: int, env: dict, gen: int = 32) -> dict:
    """Perplexity and speed of ``gguf`` on the ids file by llama.cpp (``peers/llamacpp_ppl.py``)."""
    r = last_json(run([LLAMA_PY, HERE / "peers" / "llamacpp_ppl.py", gguf, ids, "--seqlen", SEQLEN,
                       "--threads", threads, "--gen", gen], env))
    return {"perplexity": r["perplexity"], "tokens": r["tokens"],
            "tokens_per_s": r["prompt_tokens_per_s"], "load_seconds": r["load_seconds"],
            "gen_tokens_per_s": r["gen_tokens_per_s"], "llama_cpp_python": r["llama_cpp_python"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "gptq_gguf.yaml")
    ap.add_argument("--n", type=int, default=16, help="calibration windows")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--gguf-type", default="q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "gguf_llamacpp")
    args = ap.parse_args()
    if not LLAMA_PY.exists():
        sys.exit(f"{LLAMA_PY} missing: run bash benchmarks/peers/build_llamacpp.sh first")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    out = args.out_dir.resolve()
    work = out / "work"  # the model and the GGUF: large, not committed
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir, gguf = work / "model", work / f"model-{args.gguf_type}.gguf"
    run([SLIMTUNE, "compress", "--model", MODEL, "--recipe", args.recipe, "--out", model_dir,
         "--n", args.n], env)
    run([SLIMTUNE, "export", "--model", model_dir, "--format", "gguf", "--gguf-type",
         args.gguf_type, "--out", gguf], env)

    from slimtune.models import load_model

    save_test_ids(load_model(MODEL)[1], work, args.eval_tokens)
    result = {"recipe": str(args.recipe), "n": args.n, "gguf_type": args.gguf_type,
              "eval_tokens": args.eval_tokens, "threads": args.threads,
              "gguf_mb": gguf.stat().st_size / 1e6, "readers": {}}
    for data in SETS:
        for reader, path in (("slimtune", model_dir), ("transformers-gguf", gguf)):
            r = last_json(run([SLIMTUNE, "eval", "--model", path, "--data", data, "--max-tokens",
                               args.eval_tokens, "--seqlen", SEQLEN, "--json"], env))
            result["readers"].setdefault(reader, {})[data] = {
                "perplexity": r["perplexity"], "tokens": r["tokens"],
                "tokens_per_s": r["tokens_per_s"], "load_seconds": r["load_seconds"]}
        result["readers"].setdefault("llama.cpp", {})[data] = llamacpp_score(
            gguf, work / f"{data}.npy", args.threads, env)
    dense, theirs = work / "dense-f32.gguf", work / f"llamacpp-{args.gguf_type}.gguf"
    run([SLIMTUNE, "export", "--model", MODEL, "--format", "gguf", "--gguf-type", "f32",
         "--embedding-type", "f32", "--out", dense], env)
    q = last_json(run([LLAMA_PY, HERE / "peers" / "llamacpp_quantize.py", dense, theirs, "--type",
                       args.gguf_type, "--embedding-type", "q8_0", "--threads", args.threads], env))
    result["llamacpp_quantised_mb"] = q["mb"]
    for data in SETS:
        result["readers"].setdefault(f"llama.cpp on its own {args.gguf_type}", {})[data] = (
            llamacpp_score(theirs, work / f"{data}.npy", args.threads, env))
    base = result["readers"]["slimtune"]
    print(f"\n{MODEL}, {args.recipe.name} on {args.n} PTB-train windows, GGUF {args.gguf_type} "
          f"({result['gguf_mb']:.1f} MB; llama.cpp's own {args.gguf_type}: "
          f"{result['llamacpp_quantised_mb']:.1f} MB); first {args.eval_tokens} test tokens, "
          f"windows of {SEQLEN}; {args.threads} threads")
    print("| reader (model) | PTB ppl | Austen ppl | vs slimtune PTB / Austen | tokens scored | "
          "prompt tok/s PTB | gen tok/s | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for reader, by_data in result["readers"].items():
        ratios = [by_data[d]["perplexity"] / base[d]["perplexity"] for d in SETS]
        gen = by_data["ptb"].get("gen_tokens_per_s")
        print(f"| {reader} | {by_data['ptb']['perplexity']:.3f} | "
              f"{by_data['austen']['perplexity']:.3f} | {ratios[0]:.4f} / {ratios[1]:.4f} | "
              f"{by_data['ptb']['tokens']} | {by_data['ptb']['tokens_per_s']:.0f} | "
              f"{'-' if gen is None else f'{gen:.1f}'} | {by_data['ptb']['load_seconds']:.1f} |")
    worst = max(abs(result["readers"][r][d]["perplexity"] / base[d]["perplexity"] - 1)
                for r in ("transformers-gguf", "llama.cpp") for d in SETS)
    result["worst_relative_difference"] = worst
    print(f"largest difference from slimtune's perplexity: {worst:.2%} "
          f"(target <= 1%: {'PASS' if worst <= 0.01 else 'FAIL'})")
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / "result.json")


if __name__ == "__main__":
    main()
