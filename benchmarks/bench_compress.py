"""Low-rank compression of SmolLM2-135M: every method × kept ratio, plus rank allocation options.

Each configuration runs in its own subprocess (so peak RSS is its own): load the dense model, time
its forward on fixed PTB-test windows, compress all 210 projections with the recipe through the
block-by-block pipeline (calibration: N × seqlen PTB-train windows), save to a temp dir (MB on
disk), then measure PTB-test and Austen-test perplexity on the first --eval-tokens tokens and the
forward speed again (tokens/s ratio against the dense model in the same process).

Results are appended to a JSON-lines file, one line per configuration; configurations already in
the file with the same settings are skipped, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/bench_compress.py [--n 32] [--seqlen 512] [--eval-tokens 8192]
        [--ratios 0.9 0.8 0.6] [--methods svd fwsvd asvd svd_llm]
        [--allocations welore sensitivity] [--results FILE] [--table]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).with_name("results") / "compress.jsonl"


def configurations(methods, ratios, allocations):
    yield {"method": "dense"}
    for ratio in ratios:
        for method in methods:
            yield {"method": method, "ratio": ratio, "allocation": "uniform"}
    for allocation in allocations:
        yield {"method": "svd_llm", "ratio": 0.8, "allocation": allocation}
    if "fwsvd" in methods:  # the investigation of FWSVD's weighting axis (see fwsvd.py)
        for ratio in (r for r in ratios if r >= 0.8):
            yield {"method": "fwsvd", "ratio": ratio, "allocation": "uniform", "weighting": "output"}
    if "asvd" in methods:  # is ASVD's inversion against FWSVD the strength of its scaling?
        for ratio in (r for r in ratios if r >= 0.8):
            yield {"method": "asvd", "ratio": ratio, "allocation": "uniform", "alpha": 1.0}


def speed(model, windows) -> float:
    import torch

    with torch.inference_mode():
        model(windows[:1], use_cache=False)  # warm-up
        start = time.perf_counter()
        for w in windows:
            model(w[None], use_cache=False)
    return windows.numel() / (time.perf_counter() - start)


def run_one(config: dict, args) -> dict:
    """Compress and measure one configuration in this process."""
    import torch

    from slimtune.io.checkpoint import save_model
    from slimtune.data import load_text
    from slimtune.evaluate import bytes_on_disk, parameter_count, peak_rss_mb, perplexity, tokenize_text
    from slimtune.models import load_model
    from slimtune.calib import calibration_windows, run_pipeline
    from slimtune.compress.recipe import build_steps, load_recipe

    model, tok = load_model("smollm2-135m")
    ptb = tokenize_text(tok, load_text("ptb", "test"))
    austen = tokenize_text(tok, load_text("austen", "test"))
    speed_windows = ptb[: args.speed_windows * 512].view(args.speed_windows, 512)
    row = dict(config)
    dense_speed = speed(model, speed_windows)
    start = time.perf_counter()
    if config["method"] != "dense":
        recipe = load_recipe([{**config, "targets": "all-linear"}])
        windows = calibration_windows(tok, "ptb", "train", n=args.n, seqlen=args.seqlen, seed=0)
        run_pipeline(model, windows, build_steps(recipe), batch_size=args.batch_size)
    row["compress_s"] = time.perf_counter() - start
    row["compress_peak_rss_mb"] = peak_rss_mb()
    row["parameters"] = parameter_count(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(model, tok, Path(tmp) / "m", merge=config["method"] == "dense")
        row["disk_mb"] = bytes_on_disk(out) / 1e6
    for name, ids in (("ptb", ptb), ("austen", austen)):
        res = perplexity(model, ids, seqlen=512, max_tokens=args.eval_tokens, progress=False)
        row[f"ppl_{name}"] = res["perplexity"]
    compressed_speed = speed(model, speed_windows)
    row["tokens_per_s"] = compressed_speed
    row["speed_vs_dense"] = compressed_speed / dense_speed
    row["peak_rss_mb"] = peak_rss_mb()
    row["settings"] = settings(args)
    row["torch"] = torch.__version__
    row["threads"] = torch.get_num_threads()
    return row


def settings(args) -> dict:
    return {"n": args.n, "seqlen": args.seqlen, "eval_tokens": args.eval_tokens}


def key(row: dict) -> tuple:
    return (row["method"], row.get("ratio"), row.get("allocation"), row.get("weighting"),
            row.get("alpha"), json.dumps(row.get("settings"), sort_keys=True))


def print_table(rows: list[dict]) -> None:
    cols = ("method", "alloc", "ratio", "PTB ppl", "Austen ppl", "compress s", "peak RSS MB",
            "params M", "disk MB", "tok/s", "vs dense")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        label = r["method"] + (f" ({r['weighting']} weighting)" if "weighting" in r else "")
        label += f" (alpha {r['alpha']})" if "alpha" in r else ""
        print(f"| {label} | {r.get('allocation', '-')} | {r.get('ratio', 1.0)} | "
              f"{r['ppl_ptb']:.2f} | {r['ppl_austen']:.2f} | {r['compress_s']:.0f} | "
              f"{r['compress_peak_rss_mb']:.0f} | {r['parameters'] / 1e6:.1f} | {r['disk_mb']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['speed_vs_dense']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--speed-windows", type=int, default=4)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "svd_llm"])
    ap.add_argument("--allocations", nargs="*", default=["welore", "sensitivity"],
                    help="svd_llm at ratio 0.8 with these rank allocations (none: skip)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="only print the table of stored results")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args)))
        return
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            done[key(row)] = row
    print(f"# {' '.join(sys.argv)}  (calibration {args.n}×{args.seqlen} PTB train, eval first "
          f"{args.eval_tokens} tokens of PTB test / Austen test, seqlen 512)", flush=True)
    rows = []
    for config in configurations(args.methods, args.ratios, args.allocations):
        k = key({**config, "settings": settings(args)})
        if k not in done and not args.table:
            cmd = [sys.executable, __file__, "--one", json.dumps(config),
                   *[f"--{a}={getattr(args, a.replace('-', '_'))}"
                     for a in ("n", "seqlen", "batch-size", "eval-tokens", "speed-windows")]]
            print(f"running {config}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                print(f"FAILED {config}:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[k] = row
        if k in done:
            rows.append(done[k])
    print_table(rows)


if __name__ == "__main__":
    main()
