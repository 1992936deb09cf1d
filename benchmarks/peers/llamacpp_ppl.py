"""Perplexity and speed of a GGUF file through llama.cpp itself (llama-cpp-python), run in the venv
``build_llamacpp.sh`` builds (no torch, no slimtune there).

Same protocol as ``slimtune.evaluate.perplexity``: the token ids (a ``.npy`` int array the caller
wrote with the model's own tokenizer) are cut into non-overlapping windows of ``--seqlen``, the
incomplete tail dropped; in every window each of the ``seqlen - 1`` next-token predictions is
scored with llama.cpp's own logits; perplexity = exp(mean NLL). Speed: the windows' prompt
processing (tokens/s) and greedy token-by-token generation of ``--gen`` tokens.

    .venv-llamacpp/bin/python llamacpp_ppl.py MODEL.gguf IDS.npy [--seqlen 512] [--threads 2]
        [--gen 32] [--json OUT.json]
"""
import argparse
import json
import math
import time

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()

    import llama_cpp

    ids = np.load(args.ids).astype(np.int64).ravel()
    windows = len(ids) // args.seqlen
    if windows < 1:
        raise SystemExit(f"{len(ids)} tokens: not one window of {args.seqlen}")
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.seqlen, n_batch=args.seqlen,
                          n_ubatch=args.seqlen, logits_all=True, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    load_s = time.perf_counter() - start
    nll, scored, prompt_s = 0.0, 0, 0.0
    for w in range(windows):
        tokens = ids[w * args.seqlen:(w + 1) * args.seqlen].tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prompt_s += time.perf_counter() - t0
        logits = np.asarray(llm.scores[:args.seqlen])
        lp = log_softmax(logits[:-1])
        nll -= float(lp[np.arange(args.seqlen - 1), tokens[1:]].sum())
        scored += args.seqlen - 1
    # greedy generation, one token per eval, from the first 16 tokens
    llm.reset()
    llm.eval(ids[:16].tolist())
    t0 = time.perf_counter()
    for _ in range(args.gen):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    gen_s = time.perf_counter() - t0
    result = {"reader": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
              "model": args.model, "windows": windows, "seqlen": args.seqlen,
              "tokens": scored, "nll": nll / scored, "perplexity": math.exp(nll / scored),
              "load_seconds": load_s, "prompt_tokens_per_s": windows * args.seqlen / prompt_s,
              "gen_tokens_per_s": args.gen / gen_s, "threads": args.threads}
    print(json.dumps(result))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
