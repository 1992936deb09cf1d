"""Issue #13's ``--embedding-type`` table: size and llama.cpp perplexity per token-embedding type.

SmolLM2's token embedding (tied to the LM head) is 28.3M of its 134.5M parameters, so its type
sets much of a 4-bit file's size. For one compressed model directory (e.g. the one
``bench_gguf_llamacpp.py`` leaves in its ``work/``), this exports a GGUF per embedding type
(``slimtune export --format gguf --gguf-type Q --embedding-type E``) and scores each with
llama.cpp (``peers/llamacpp_ppl.py``) on the first ``--eval-tokens`` of PTB test and Austen test
(windows of 512, token ids from slimtune's tokenizer).

    .venv/bin/python benchmarks/bench_gguf_embedding.py --model-dir DIR [--gguf-type q4_0]
        [--types f32 f16 q8_0 q4_0] [--eval-tokens 8192] [--threads 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_gguf_llamacpp import (LLAMA_PY, MODEL, SEQLEN, SETS, SLIMTUNE, llamacpp_score,  # noqa: E402
                                 run, save_test_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--gguf-type", default="q4_0")
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the rows as JSON (atomically)")
    args = ap.parse_args()
    if not LLAMA_PY.exists():
        sys.exit(f"{LLAMA_PY} missing: run bash benchmarks/peers/build_llamacpp.sh first")
    if not args.model_dir.is_dir():
        sys.exit(f"--model-dir {args.model_dir} is not a directory")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    from slimtune.models import load_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-embedding-") as tmp:
        save_test_ids(load_model(MODEL)[1], Path(tmp), args.eval_tokens)
        for emb in args.types:
            gguf = Path(tmp) / f"model-{emb}.gguf"
            run([SLIMTUNE, "export", "--model", args.model_dir, "--format", "gguf",
                 "--gguf-type", args.gguf_type, "--embedding-type", emb, "--out", gguf], env)
            row = {"embedding_type": emb, "mb": gguf.stat().st_size / 1e6}
            for data in SETS:
                r = llamacpp_score(gguf, Path(tmp) / f"{data}.npy", args.threads, env, gen=8)
                row[f"ppl_{data}"] = r["perplexity"]
                row[f"prompt_tokens_per_s_{data}"] = r["tokens_per_s"]
            rows.append(row)
            gguf.unlink()
    print(f"\n{args.model_dir} as GGUF {args.gguf_type}, perplexity by llama.cpp on the first "
          f"{args.eval_tokens} test tokens, windows of {SEQLEN}, {args.threads} threads")
    print("| embedding | MB | PTB ppl | Austen ppl | prompt tok/s PTB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['embedding_type']} | {r['mb']:.1f} | {r['ppl_ptb']:.3f} | "
              f"{r['ppl_austen']:.3f} | {r['prompt_tokens_per_s_ptb']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps({"model_dir": str(args.model_dir), "gguf_type": args.gguf_type,
                                   "eval_tokens": args.eval_tokens, "rows": rows}, indent=1) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
