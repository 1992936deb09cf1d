"""Perplexity and speed of an exported model as plain transformers reads it -- a compressed-tensors
or Hugging Face directory, or a ``.gguf`` file (transformers' GGUF loader) -- in a process that
never imports slimtune (it checks that at the end).

Same protocol as ``slimtune.evaluate.perplexity`` and ``llamacpp_ppl.py``: the token ids (a
``.npy`` written with the model's own tokenizer) are cut into non-overlapping windows of
``--seqlen``, the incomplete tail dropped; every next-token prediction inside each window is
scored; perplexity = exp(mean NLL). Speed: the windows' forward (tokens/s) and greedy
token-by-token generation of ``--gen`` tokens with the KV cache.

``--how``: ``packed`` = ``from_pretrained(DIR)`` (compressed-tensors keeps what it can packed);
``dequantize`` = ``CompressedTensorsConfig(dequantize=True)`` (asymmetric grids need it);
``peft`` = ``dequantize`` + ``PeftModel.from_pretrained(model, DIR/adapter)``; ``plain`` = a
dense directory or a ``.gguf`` file.

    .venv/bin/python benchmarks/peers/transformers_ppl.py MODEL IDS.npy [IDS2.npy ...]
        [--how plain] [--seqlen 512] [--threads 2] [--gen 32]

Prints one JSON line: ``{"sets": {ids file stem: {"perplexity", "tokens", "tokens_per_s"}},
"gen_tokens_per_s", "load_seconds", ...}`` (the model is loaded once for all the files).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch


def load(model: str, how: str):
    from transformers import AutoModelForCausalLM

    if model.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(model) or ".",
                                                    gguf_file=os.path.basename(model),
                                                    dtype=torch.float32)
    kw = {}
    if how in ("dequantize", "peft"):
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
    if how == "peft":
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, os.path.join(model, "adapter"))
    return lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids", nargs="+")
    ap.add_argument("--how", choices=["plain", "packed", "dequantize", "peft"], default="plain")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    sets = {os.path.splitext(os.path.basename(f))[0]: torch.from_numpy(
        np.load(f).astype(np.int64).ravel()) for f in args.ids}
    for name, ids in sets.items():
        if len(ids) < args.seqlen:
            raise SystemExit(f"{name}: {len(ids)} tokens, not one window of {args.seqlen}")
    start = time.perf_counter()
    lm = load(args.model, args.how).eval()
    load_s = time.perf_counter() - start
    result = {"sets": {name: score(lm, ids, args.seqlen) for name, ids in sets.items()}}
    first = next(iter(sets.values()))
    with torch.no_grad():
        past, token = None, first[None, :16]
        t0 = time.perf_counter()
        for _ in range(args.gen):  # greedy, one token per forward
            out = lm(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        gen_s = time.perf_counter() - t0
    assert "slimtune" not in sys.modules, "this reader must not import slimtune"
    print(json.dumps({**result, "gen_tokens_per_s": args.gen / gen_s, "load_seconds": load_s,
                      "how": args.how, "threads": args.threads}))


@torch.no_grad()
def score(lm, ids: torch.Tensor, seqlen: int) -> dict:
    windows = len(ids) // seqlen
    nll, scored, forward_s = 0.0, 0, 0.0
    for w in range(windows):
        tokens = ids[w * seqlen:(w + 1) * seqlen][None]
        t0 = time.perf_counter()
        logits = lm(input_ids=tokens).logits[0].double()
        forward_s += time.perf_counter() - t0
        lp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(lp[torch.arange(seqlen - 1), tokens[0, 1:]].sum())
        scored += seqlen - 1
    return {"perplexity": math.exp(nll / scored), "tokens": scored,
            "tokens_per_s": windows * seqlen / forward_s}


if __name__ == "__main__":
    main()
