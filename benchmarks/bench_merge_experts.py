"""Merging three real SmolLM2 experts: quality per domain, time and peak RSS, beside mergekit.

The experts come from ``benchmarks/make_merge_experts.py``: Austen, PTB and fine-food reviews
(``finefoods-text``), each as full fine-tuning and as LoRA r=16, same recipe and seed. Every
method merges the three (weights 1.0 each; ``slerp`` the Austen and PTB experts, t = 0.5):

- ``--kind full``: the three fine-tuned model directories, with ``slimtune merge``; for the
  methods mergekit 0.1.5 has (linear, task_arithmetic, ties, dare_ties, breadcrumbs, slerp) the
  same inputs and configs with ``mergekit-yaml`` as well, ours and theirs alternating, the
  largest absolute difference between the two outputs over every tensor and how many entries
  differ by more than 1e-6 (``ties_peer``, ``breadcrumbs_peer``: with ``tie_break: peer``).
- ``--kind lora``: the three adapter directories; methods with a factored merge (linear,
  task_arithmetic, flora, knots, lora_lego) write an adapter, the others densify.

Each merge runs in its own process (``os.wait4`` gives its peak RSS and wall time; each tool at
--threads torch threads), then the output is scored in another: perplexity on the first
--eval-tokens tokens of each domain's test split in windows of --seqlen, and *normalised* by the
expert of that domain (1.0: as good as the expert; the base model's row shows where merging
starts from). Rows are appended to --results (JSON lines); a row already there is skipped, so an
interrupted run resumes.

    PYTHONPATH=benchmarks/peers/.mergekit-pkgs .venv/bin/python benchmarks/bench_merge_experts.py
        [--kind full|lora|both] [--methods ties dare ...] [--no-mergekit] [--eval-tokens 8192]
        [--seqlen 512] [--threads 2] [--experts out/experts] [--work DIR] [--results FILE]
        [--table]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("austen", "ptb", "finefoods-text")
FULL = {  # method -> (our config keys, mergekit method and global parameters) or None
    "linear": ({}, ("linear", {"normalize": True})),
    "task_arithmetic": ({"lambda": 1.0}, ("task_arithmetic", {"lambda": 1.0})),
    "ties": ({"density": 0.5}, ("ties", {"density": 0.5, "normalize": True})),
    "ties_peer": ({"method": "ties", "density": 0.5, "tie_break": "peer"},
                  ("ties", {"density": 0.5, "normalize": True})),
    "ties_model": ({"method": "ties", "density": 0.5, "scope": "model"}, None),
    "dare": ({"density": 0.5, "rescale": "l1", "then": "ties", "seed": 0},
             ("dare_ties", {"density": 0.5})),
    "dare_inverse": ({"method": "dare", "density": 0.5, "seed": 0}, None),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.01}, ("breadcrumbs", {"density": 0.5,
                                                                      "gamma": 0.01})),
    "breadcrumbs_peer": ({"method": "breadcrumbs", "density": 0.5, "gamma": 0.01,
                          "tie_break": "peer"}, ("breadcrumbs", {"density": 0.5, "gamma": 0.01})),
    "slerp": ({"t": 0.5}, ("slerp", {"t": 0.5})),
    "pcb": ({"ratio": 0.1}, None),
    "tall_masks": ({"lambdas": 0.4, "consensus": 2}, None),
    "tsv": ({}, None),
    "knots": ({"density": 0.5}, None),
    "compeft": ({"density": 0.2, "scale": 1.0}, None),
}
LORA = {"linear": {}, "task_arithmetic": {"lambda": 1.0}, "flora": {}, "knots": {"density": 0.5},
        "lora_lego": {"rank": 16, "seed": 0}, "ties": {"density": 0.5},
        "dare": {"density": 0.5, "rescale": "l1", "then": "ties", "seed": 0},
        "breadcrumbs": {"density": 0.5, "gamma": 0.01}, "pcb": {"ratio": 0.1},
        "tall_masks": {"lambdas": 0.4, "consensus": 2}, "tsv": {},
        "compeft": {"density": 0.2, "scale": 1.0}}

MERGE_OURS = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from slimtune.merge.models import merge_models
merge_models(sys.argv[1], sys.argv[2], progress=False)
"""
SCORE = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from pathlib import Path
from slimtune.data import load_text
from slimtune.evaluate import perplexity, tokenize_text
from slimtune.models import load_model
path, tokens, seqlen = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
if (path / "adapter.json").is_file():
    from slimtune import adapt
    manifest = adapt.read_manifest(path)
    model, tok = load_model(manifest["base_model"])
    model = adapt.merge(adapt.load(model, path))
else:
    model, tok = load_model(str(path))
out = {}
for domain in sys.argv[5:]:
    ids = tokenize_text(tok, load_text(domain, "test"))
    out[domain] = perplexity(model, ids, seqlen=seqlen, max_tokens=tokens,
                             progress=False)["perplexity"]
print(json.dumps(out))
"""
DIFF = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
def tensors(d):
    files = sorted(Path(d).glob("*.safetensors"))
    return {k: (f, k) for f in files for k in safe_open(str(f), "pt").keys()}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
worst, differ, names = 0.0, 0, sorted(set(a) & set(b))
for n in names:
    x = safe_open(str(a[n][0]), "pt").get_tensor(n).double()
    y = safe_open(str(b[n][0]), "pt").get_tensor(n).double()
    worst = max(worst, float((x - y).abs().max()))
    differ += int(((x - y).abs() > 1e-6).sum())
print(worst, len(names), len(set(a) ^ set(b)), differ)
"""


def run_child(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """``(seconds, peak RSS MB, stdout)`` of one child process (its own peak, from ``wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = b"", b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def score(path: Path, args) -> dict:
    _, _, out = run_child([sys.executable, "-c", SCORE, str(path), str(args.eval_tokens),
                           str(args.threads), str(args.seqlen), *DOMAINS])
    return json.loads(out.strip().splitlines()[-1])


def inputs(kind: str, method: str, experts: Path) -> list[Path]:
    names = ["austen", "ptb"] if method == "slerp" else list(DOMAINS)
    return [experts / f"{d}-{kind}" for d in names]


def our_config(method: str, keys: dict, paths: list[Path]) -> dict:
    keys = dict(keys)
    return {"method": keys.pop("method", method), "base": "smollm2-135m",
            "models": [{"path": str(p), "weight": 1.0} for p in paths], **keys}


def mergekit_config(name: str, params: dict, paths: list[Path], base: Path) -> dict:
    per_model = {k: v for k, v in params.items() if k in ("density", "gamma")}
    if name == "slerp":
        return {"merge_method": "slerp", "base_model": str(paths[0]), "dtype": "float32",
                "models": [{"model": str(p)} for p in paths], "parameters": {"t": params["t"]}}
    config = {"merge_method": name, "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 1.0, **per_model}}
                         for p in paths],
              "parameters": {k: v for k, v in params.items() if k not in per_model}}
    if name != "linear":
        config["base_model"] = str(base)
    return config


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def thread_env(threads: int, extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**env, **(extra or {})}


def merge_ours(config: dict, out: Path, args) -> tuple[float, float]:
    file = out.with_suffix(".yaml")
    file.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, _ = run_child([sys.executable, "-c", MERGE_OURS, str(file), str(out),
                                 str(args.threads)], thread_env(args.threads))
    return seconds, rss


def merge_mergekit(config: dict, out: Path, args) -> tuple[float, float]:
    file = out.with_suffix(".yaml")
    file.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, _ = run_child(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", str(file), str(out), "--no-cuda",
         "--random-seed", "0", "--quiet", "-j", str(args.threads)],
        thread_env(args.threads, {"PYTHONPATH": args.mergekit}))
    return seconds, rss


def max_difference(a: Path, b: Path) -> dict:
    _, _, out = run_child([sys.executable, "-c", DIFF, str(a), str(b)], thread_env(1))
    worst, shared, unshared, differ = out.split()
    return {"max_abs_diff": float(worst), "tensors": int(shared), "unshared": int(unshared),
            "entries_over_1e-6": int(differ)}


def normalised(ppl: dict, experts: dict) -> dict:
    return {d: ppl[d] / experts[d] for d in DOMAINS}


def run(args) -> None:
    from slimtune.models import resolve_model_dir

    base = resolve_model_dir("smollm2-135m")
    settings = {"eval_tokens": args.eval_tokens, "seqlen": args.seqlen, "threads": args.threads}
    rows = [r for r in read_rows(args.results) if r["settings"] == settings]
    done = {(r["kind"], r["method"]) for r in rows}
    args.work.mkdir(parents=True, exist_ok=True)
    kinds = ["full", "lora"] if args.kind == "both" else [args.kind]
    for kind in ["reference", *kinds]:
        for name, path in ([("base", base)] if kind == "reference" else
                           [(f"expert-{d}", args.experts / f"{d}-{kind}") for d in DOMAINS]):
            key = ("reference", name if kind == "reference" else f"{name}-{kind}")
            if key not in done:
                row = {"kind": key[0], "method": key[1], "settings": settings,
                       "ppl": score(path, args)}
                append(args.results, row)
                rows.append(row)
    reference = {r["method"]: r["ppl"] for r in rows if r["kind"] == "reference"}
    for kind in kinds:
        experts = {d: reference[f"expert-{d}-{kind}"][d] for d in DOMAINS}
        table = FULL if kind == "full" else LORA
        for i, method in enumerate(m for m in args.methods or table if m in table):
            if (kind, method) in done:
                continue
            keys = table[method][0] if kind == "full" else table[method]
            paths = inputs(kind, method, args.experts)
            ours_out = args.work / f"{kind}-{method}-ours"
            peer = table[method][1] if kind == "full" and args.mergekit else None
            row = {"kind": kind, "method": method, "settings": settings,
                   "config": our_config(method, keys, paths)}
            order = ["ours", "mergekit"] if i % 2 == 0 else ["mergekit", "ours"]
            for tool in order:
                if tool == "ours":
                    row["seconds"], row["peak_rss_mb"] = merge_ours(row["config"], ours_out, args)
                elif peer is not None:
                    theirs_out = args.work / f"{kind}-{method}-mergekit"
                    config = mergekit_config(peer[0], peer[1], paths, base)
                    seconds, rss = merge_mergekit(config, theirs_out, args)
                    row["mergekit"] = {"config": config, "seconds": seconds, "peak_rss_mb": rss}
            if "mergekit" in row:
                row["mergekit"].update(max_difference(ours_out, theirs_out))
                shutil.rmtree(theirs_out)
            row["output"] = "adapter" if (ours_out / "adapter.json").is_file() else "model"
            row["ppl"] = score(ours_out, args)
            row["normalised"] = normalised(row["ppl"], experts)
            row["mean_normalised"] = sum(row["normalised"].values()) / len(DOMAINS)
            shutil.rmtree(ours_out)
            append(args.results, row)


def table(args) -> None:
    rows = read_rows(args.results)
    reference = {r["method"]: r for r in rows if r["kind"] == "reference"}
    print("| model | " + " | ".join(f"{d} ppl" for d in DOMAINS) + " |")
    print("|---|" + "---|" * len(DOMAINS))
    for name, r in reference.items():
        print(f"| {name} | " + " | ".join(f"{r['ppl'][d]:.2f}" for d in DOMAINS) + " |")
    print()
    print("| inputs | method | output | " + " | ".join(f"{d} / expert" for d in DOMAINS) +
          " | mean | merge s | peak RSS MB | mergekit s | mergekit RSS MB | max abs diff |"
          " entries > 1e-6 |")
    print("|---|---|---|" + "---|" * (len(DOMAINS) + 7))
    for r in rows:
        if r["kind"] == "reference":
            continue
        peer = r.get("mergekit")
        cells = [f"{r['normalised'][d]:.3f}" for d in DOMAINS]
        peer_cells = ([f"{peer['seconds']:.1f}", f"{peer['peak_rss_mb']:.0f}",
                       f"{peer['max_abs_diff']:.1e}", str(peer.get("entries_over_1e-6", "-"))]
                      if peer else ["-", "-", "-", "-"])
        print(f"| {r['kind']} | {r['method']} | {r['output']} | " + " | ".join(cells) +
              f" | {r['mean_normalised']:.3f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | " +
              " | ".join(peer_cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("full", "lora", "both"), default="both")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--no-mergekit", dest="mergekit", action="store_const", const=None,
                        default=str(ROOT / "benchmarks" / "peers" / ".mergekit-pkgs"))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=Path, default=ROOT / "out" / "experts")
    parser.add_argument("--work", type=Path,
                        default=ROOT / "benchmarks" / "results" / "merge_experts" / "work")
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks" / "results" / "merge_experts.jsonl")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    print("$ " + " ".join(sys.argv), flush=True)
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
