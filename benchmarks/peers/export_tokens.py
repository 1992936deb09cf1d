"""Export slimtune's calibration windows and test token ids for a peer tool to read.

Runs in the slimtune venv (it imports slimtune). Writes two safetensors files
(``safetensors.torch.save_file``) that ``llmcompressor_run.py`` (which runs in the peer venv
without slimtune) reads, so the peer calibrates and is scored on exactly the tokens slimtune uses:

* ``--windows FILE``: ``input_ids`` int64 ``[n, seqlen]`` from
  ``slimtune.calib.calibration_windows(tokenizer, data, split, n, seqlen, seed)``
  (default PTB train, 128 × 512, seed 0).
* ``--eval FILE``: ``ptb`` and ``austen`` int64 1-D token ids of each test split, tokenised the
  way slimtune's perplexity numbers are (``slimtune.evaluate.tokenize_text`` of
  ``slimtune.data.load_text(name, "test")``: the whole split in one call, no special tokens).

Optionally (``--dense-ppl OUT.json``) it also scores the dense model with
``slimtune.evaluate.perplexity`` on those eval tokens (``--eval-seqlen`` / ``--eval-tokens``),
the reference the peer script's dense perplexity must match.

Example::

    .venv/bin/python benchmarks/peers/export_tokens.py --model smollm2-135m -n 128 \\
        --windows out/peers/windows.safetensors --eval out/peers/eval.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimtune.calib import calibration_windows
from slimtune.data import load_text
from slimtune.evaluate import perplexity, tokenize_text
from slimtune.models import load_model, resolve_model_dir

EVAL_SETS = ("ptb", "austen")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registered name or model directory")
    ap.add_argument("--windows", type=Path, required=True, help="output: calibration windows")
    ap.add_argument("--eval", type=Path, required=True, help="output: test token ids")
    ap.add_argument("-n", "--n", type=int, default=128, help="calibration windows (128)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length (512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="ptb", help="calibration text (ptb)")
    ap.add_argument("--split", default="train", help="calibration split (train)")
    ap.add_argument("--eval-sets", default=",".join(EVAL_SETS), help="test sets (ptb,austen)")
    ap.add_argument("--dense-ppl", type=Path, help="also write slimtune's dense perplexity here")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model, tok = load_model(model_dir)

    windows = calibration_windows(tok, data=args.data, split=args.split, n=args.n,
                                  seqlen=args.seqlen, seed=args.seed)
    meta = {"model": str(model_dir), "data": args.data, "split": args.split, "n": str(args.n),
            "seqlen": str(args.seqlen), "seed": str(args.seed)}
    args.windows.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": windows.to(torch.int64).contiguous()}, str(args.windows), metadata=meta)

    sets = [s for s in args.eval_sets.split(",") if s]
    test_ids = {s: tokenize_text(tok, load_text(s, "test")).to(torch.int64).contiguous()
                for s in sets}
    args.eval.parent.mkdir(parents=True, exist_ok=True)
    save_file(test_ids, str(args.eval), metadata={"model": str(model_dir), "split": "test"})
    print(f"model {model_dir}\nwrote {args.windows}: input_ids {list(windows.shape)} "
          f"({args.data}/{args.split}, seed {args.seed})")
    print(f"wrote {args.eval}: " + ", ".join(f"{s} {v.numel()} tokens" for s, v in test_ids.items()))

    if args.dense_ppl is not None:
        result = {"model": str(model_dir), "eval_seqlen": args.eval_seqlen,
                  "eval_tokens": args.eval_tokens, "threads": args.threads,
                  "torch": torch.__version__, "ppl": {}, "nll": {}}
        for s, ids in test_ids.items():
            res = perplexity(model, ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens,
                             progress=False)
            result["ppl"][s], result["nll"][s] = res["perplexity"], res["nll"]
            print(f"slimtune dense perplexity {s}: {res['perplexity']:.6f} (nll {res['nll']:.8f})")
        args.dense_ppl.parent.mkdir(parents=True, exist_ok=True)
        args.dense_ppl.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.dense_ppl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
