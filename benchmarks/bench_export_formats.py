"""Issue #13's per-format benchmark: compressed SmolLM2-135M models, each exported to every
format, each format scored by the readers people use.

Settings: the issue's four (gptq 4-bit g32, gptq 3-bit g64 + eora 32, rtn 4-bit per channel,
sparsegpt 2:4 + gptq 4-bit; symmetric grids with fp16 scales, which Q4_0 carries exactly) and
rtn 4-bit g32 asymmetric (Q4_1, whose fp16 offsets are not exact: the error is reported). For
each: ``slimtune compress`` (``--n`` PTB-train windows of 512), then ``slimtune export`` to
compressed-tensors (``ct/``, with ``ct/adapter`` for low-rank parts), GGUF (the setting's type:
``auto`` keeps the quantised integers exactly; a model with low-rank parts goes to ``f16``,
which folds them in, since no quantised GGUF type holds them -- and, to show what the
alternative costs, also to ``q4_0 --requantize``, scored by llama.cpp) and a dense Hugging Face
directory (``hf/``). Readers, each in its own process, on the first ``--eval-tokens`` of PTB
test and Austen test (windows of 512, the same token ids for every reader):

- slimtune (``slimtune eval``) on its own saved model;
- transformers + compressed-tensors (+ PEFT for the adapter) on ``ct/``, transformers' GGUF
  loader on the ``.gguf``, transformers on ``hf/`` -- all via ``peers/transformers_ppl.py``,
  which never imports slimtune;
- llama.cpp (``peers/llamacpp_ppl.py`` in the venv ``peers/build_llamacpp.sh`` builds) on the
  ``.gguf``.

Reports MB on disk per format, perplexity per reader (and its ratio to slimtune's), load time,
forward tokens/s over the 512-token windows and greedy generation tokens/s. Writes
``<out-dir>/<setting>.json`` atomically (a rerun skips settings whose file exists; ``--redo``)
and prints one table; every command it ran is printed first.

    .venv/bin/python benchmarks/bench_export_formats.py [--settings REGEX] [--n 128]
        [--eval-tokens 8192] [--threads 2] [--out-dir benchmarks/results/export_formats] [--redo]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from bench_common import cpu_model, git_commit
from bench_gguf_llamacpp import (LLAMA_PY, MODEL, SEQLEN, SETS, SLIMTUNE, last_json,
                                 llamacpp_score, run, save_test_ids)

HERE = Path(__file__).resolve().parent
READER = HERE / "peers" / "transformers_ppl.py"
GPTQ = "{method: gptq, bits: %d, group_size: %d, sym: true, act_order: true, fp16_scales: true}"
# name -> (recipe, GGUF type); sym grids with fp16 scales: Q4_0 carries them exactly
SETTINGS = {
    "gptq-w4-g32": (f"- {GPTQ % (4, 32)}", "auto"),
    "gptq-w3-g64+eora32": (f"- {GPTQ % (3, 64)}\n- {{method: eora, rank: 32}}", "f16"),
    "rtn-w4-channel": ("- {method: rtn, bits: 4, group_size: null, sym: true, fp16_scales: true}",
                       "auto"),
    "sparsegpt-2:4+gptq-w4-g32": ("- {method: sparsegpt, sparsity: 0.5, pattern: '2:4'}\n"
                                  f"- {GPTQ % (4, 32)}", "auto"),
    # asymmetric: Q4_1, whose fp16 offsets are not exact (the error is reported)
    "rtn-w4-g32-asym": ("- {method: rtn, bits: 4, group_size: 32, sym: false, fp16_scales: true}",
                        "auto"),
}
# settings whose low-rank parts a quantised GGUF cannot hold: also folded and re-quantised to
# this type (--requantize, round-to-nearest) and scored by llama.cpp, to show what that costs
REQUANTIZED = {"gptq-w3-g64+eora32": "q4_0"}


def stem(name: str) -> str:
    """``name`` as a file name (``sparsegpt-2:4+...`` -> ``sparsegpt-2_4+...``)."""
    return re.sub(r"[^\w.+-]", "_", name)


def megabytes(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def slimtune_score(model: Path, args, env) -> dict:
    scores = {}
    for data in SETS:
        r = last_json(run([SLIMTUNE, "eval", "--model", model, "--data", data, "--max-tokens",
                           args.eval_tokens, "--seqlen", SEQLEN, "--json"], env))
        scores[data] = {k: r[k] for k in ("perplexity", "tokens", "tokens_per_s", "load_seconds")}
    return scores


def transformers_score(model: Path, how: str, work: Path, args, env) -> dict:
    r = last_json(run([sys.executable, READER, model, *(work / f"{d}.npy" for d in SETS),
                       "--how", how, "--seqlen", SEQLEN, "--threads", args.threads], env))
    return {d: {**r["sets"][d], "load_seconds": r["load_seconds"],
                "gen_tokens_per_s": r["gen_tokens_per_s"], "how": how} for d in SETS}


def one_setting(name: str, args, env, work: Path) -> dict:
    recipe_text, gguf_type = SETTINGS[name]
    folder = work / stem(name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text + "\n")
    print(f"--- {name}: {recipe_text!r}", flush=True)
    model, ct, gguf, hf = folder / "model", folder / "ct", folder / "model.gguf", folder / "hf"
    t = time.perf_counter()
    run([SLIMTUNE, "compress", "--model", MODEL, "--recipe", recipe, "--out", model, "--n",
         args.n], env)
    compress_s = time.perf_counter() - t
    ct_info = last_json(run([SLIMTUNE, "export", "-m", model, "-f", "compressed-tensors", "-o", ct],
                            env))
    gguf_info = last_json(run([SLIMTUNE, "export", "-m", model, "-f", "gguf", "--gguf-type",
                               gguf_type, "-o", gguf], env))
    run([SLIMTUNE, "export", "-m", model, "-f", "hf", "-o", hf], env)
    extra = {}
    if name in REQUANTIZED:
        kind = REQUANTIZED[name]
        folded = folder / f"requantized-{kind}.gguf"
        run([SLIMTUNE, "export", "-m", model, "-f", "gguf", "--gguf-type", kind, "--requantize",
             "-o", folded], env)
        extra[f"llama.cpp (low-rank folded, re-quantised to {kind})"] = (
            f"gguf {kind} --requantize", folded,
            {d: llamacpp_score(folded, work / f"{d}.npy", args.threads, env) for d in SETS})
    how = ("peft" if ct_info["adapter_layers"] else
           "dequantize" if ct_info["asymmetric"] or ct_info["schemes"] > 1 else "packed")
    readers = {
        "slimtune": ("slimtune", model, slimtune_score(model, args, env)),
        f"transformers + compressed-tensors ({how})": (
            "compressed-tensors", ct, transformers_score(ct, how, work, args, env)),
        "transformers GGUF loader": ("gguf", gguf, transformers_score(gguf, "plain", work, args,
                                                                      env)),
        "llama.cpp": ("gguf", gguf, {d: llamacpp_score(gguf, work / f"{d}.npy", args.threads, env)
                                     for d in SETS}),
        "transformers (dense hf)": ("hf", hf, transformers_score(hf, "plain", work, args, env)),
        **extra,
    }
    return {"setting": name, "recipe": recipe_text, "gguf_type": gguf_type,
            "gguf_layers": gguf_info["layers"],
            "q4_1_offset_error": gguf_info.get("q4_1_offset_error"), "n": args.n, "eval_tokens": args.eval_tokens,
            "threads": args.threads, "compress_seconds": compress_s, "git": git_commit(),
            "cpu": cpu_model(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mb": {**{fmt: megabytes(path) for fmt, path in
                      (("slimtune", model), ("compressed-tensors", ct), ("gguf", gguf),
                       ("hf", hf))},
                   **{fmt: megabytes(path) for fmt, path, _ in extra.values()}},
            "readers": {r: {"format": fmt, **scores} for r, (fmt, _, scores) in readers.items()}}


def print_table(results: list[dict]) -> None:
    print("| setting | format (MB) | reader | PTB ppl | Austen ppl | vs slimtune PTB / Austen | "
          "forward tok/s | gen tok/s | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        base = res["readers"]["slimtune"]
        for reader, r in res["readers"].items():
            ratio = " / ".join(f"{r[d]['perplexity'] / base[d]['perplexity']:.4f}" for d in SETS)
            gen = r["ptb"].get("gen_tokens_per_s")
            fmt = r["format"] + (f" {res['gguf_type']}" if r["format"] == "gguf" else "")
            if r["format"] == "gguf" and res.get("q4_1_offset_error") is not None:
                fmt += f", Q4_1 offset error {res['q4_1_offset_error']:.1e}"
            print(f"| {res['setting']} | {fmt} ({res['mb'][r['format']]:.1f} MB) | {reader} | "
                  f"{r['ptb']['perplexity']:.3f} | {r['austen']['perplexity']:.3f} | {ratio} | "
                  f"{r['ptb']['tokens_per_s']:.0f} | {'-' if gen is None else f'{gen:.1f}'} | "
                  f"{r['ptb']['load_seconds']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default=".", help="regex (re.search) on setting names")
    ap.add_argument("--n", type=int, default=128, help="calibration windows")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "export_formats")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    names = [n for n in SETTINGS if re.search(args.settings, n)]
    if not names:
        ap.error(f"--settings {args.settings!r} matches none of {', '.join(SETTINGS)}")
    if not LLAMA_PY.exists():
        sys.exit(f"{LLAMA_PY} missing: run bash benchmarks/peers/build_llamacpp.sh first")
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    out = args.out_dir.resolve()
    work = out / "work"  # models and exports: large, not committed
    work.mkdir(parents=True, exist_ok=True)
    from slimtune.models import load_model

    save_test_ids(load_model(MODEL)[1], work, args.eval_tokens)
    for name in names:
        path = out / f"{stem(name)}.json"
        if path.exists() and not args.redo:
            continue
        result = one_setting(name, args, env, work)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    files = [out / f"{stem(n)}.json" for n in SETTINGS]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    print(f"\n{MODEL}; {args.n} PTB-train calibration windows of 512; first {args.eval_tokens} "
          f"test tokens, windows of {SEQLEN}; {args.threads} threads")
    print_table(results)


if __name__ == "__main__":
    main()
