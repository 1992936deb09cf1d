"""Compression grid of issue #12: SmolLM2-135M, all 210 projections, slimtune beside llm-compressor.

The rows are in ``compress_grid_rows.py``. Every row runs in its own subprocess (its own peak RSS
and time; a crash loses that row only) and writes ``<out-dir>/<row>.json`` atomically; a rerun
skips rows whose file exists (``--redo``: run them again). At the end (or with ``--table-only``)
it prints a markdown table of every row present and the literature's orderings among them.

Own rows: load the model, calibration windows ``calibration_windows(tok, "ptb", "train", n,
seqlen, seed=--calib-seed)`` (checked equal to the file exported for the peer), ``run_pipeline`` (timed:
``compress_seconds``), ``storage_report`` of the compressed layers, perplexity on the first
--eval-tokens of PTB test and Austen test (seqlen 512, ``slimtune.evaluate.perplexity``; tokens
checked equal to the peer's eval file), greedy generation of 32 tokens from a 16-token PTB-test
prompt and the forward of one 512-token window (tokens/s, median of 3), peak RSS (after all
that), then ``save_model`` to a temp dir (MB on disk) and a reload whose logits must equal the
in-memory ones. Peer rows: ``benchmarks/peers/llmcompressor_run.py`` in its own venv on the same
windows and eval tokens (exported once per window count by ``peers/export_tokens.py`` into
``<out-dir>/tokens/``). Several calibration seeds (the spread of a setting, for both tools): one
``--out-dir`` per ``--calib-seed``; the seed is part of the token files' names and of every row.

    .venv/bin/python benchmarks/bench_compress_grid.py [--rows REGEX] [--windows 128]
        [--seqlen 512] [--threads 1] [--eval-tokens 8192] [--out-dir DIR] [--skip-peer]
        [--calib-seed 0] [--sequential auto] [--stats-precision auto] [--redo] [--table-only]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import cpu_model, git_commit  # noqa: E402
from compress_grid_rows import MODEL, file_stem, grid, orderings  # noqa: E402

ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "compress_grid"
PEER_PY = HERE / "peers" / ".venv-llmcompressor" / "bin" / "python"
PEER_RUN, EXPORT = HERE / "peers" / "llmcompressor_run.py", HERE / "peers" / "export_tokens.py"
EVAL_SEQLEN, BATCH_SIZE, GEN_PROMPT, GEN_NEW = 512, 2, 16, 32


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_info(row: dict, args) -> dict:
    return {"row": row["name"], "kind": row["kind"], "label": row["label"],
            "windows": row["windows"] or args.windows, "seqlen": args.seqlen,
            "calib_seed": args.calib_seed,
            "threads": args.threads, "eval_tokens": args.eval_tokens, "eval_seqlen": EVAL_SEQLEN,
            "torch": version("torch"), "git": git_commit(), "cpu": cpu_model(),
            "loadavg_start": os.getloadavg(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def token_files(args, n: int) -> tuple[Path, Path]:
    d = args.out_dir / "tokens"
    seed = f"-seed{args.calib_seed}" if args.calib_seed else ""
    return d / f"windows-{n}x{args.seqlen}{seed}.safetensors", d / "eval.safetensors"


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1"}


def export_tokens(args, n: int) -> None:
    windows, evals = token_files(args, n)
    if windows.exists() and evals.exists():
        return
    windows.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_e = (p.with_name(f".tmp-{os.getpid()}-{p.name}") for p in (windows, evals))
    subprocess.run([sys.executable, str(EXPORT), "--model", MODEL, "-n", str(n), "--seqlen",
                    str(args.seqlen), "--windows", str(tmp_w), "--eval", str(tmp_e),
                    "--threads", str(args.threads), "--seed", str(args.calib_seed)], check=True, env=thread_env(args.threads))
    os.replace(tmp_w, windows)
    os.replace(tmp_e, evals)


def median_rate(fn, count: int, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def step_summaries(report: dict, steps, configs) -> list[dict]:
    out = []
    for entry, step, config in zip(report["steps"], steps, configs):
        per_layer = getattr(step, "report", None) or {}
        s = {"method": config.method, "kind": entry["kind"], "layers": len(entry["layers"]),
             "fallbacks": len(entry["fallbacks"]), "seconds": entry["seconds"],
             "fallback_example": next(iter(entry["fallbacks"].items()), None)}
        damps = [r["damp"] for r in per_layer.values() if "damp" in r]
        if damps:
            s.update(damp_min=min(damps), damp_max=max(damps),
                     damp_raised=sum(d > config.damp * (1 + 1e-9) for d in damps))
        if callable(getattr(step, "summary", None)):
            s["summary"] = step.summary()
        out.append(s)
    return out


def run_ours(row: dict, args) -> dict:
    """One own row, in this (sub)process."""
    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from slimtune.calib import calibration_windows, run_pipeline
    from slimtune.compress import build_steps, check_targets, load_recipe
    from slimtune.data import load_text
    from slimtune.evaluate import bytes_on_disk, peak_rss_mb, perplexity, tokenize_text
    from slimtune.io.checkpoint import save_model
    from slimtune.layers import storage_report
    from slimtune.models import load_model
    from slimtune.targets import match_targets

    res = run_info(row, args)
    res.update(recipe=row["recipe"], batch_size=BATCH_SIZE, threads=torch.get_num_threads(),
               sequential=args.sequential, stats_precision_option=args.stats_precision)
    model, tok = load_model(MODEL)
    n = res["windows"]
    windows = calibration_windows(tok, "ptb", "train", n, args.seqlen, seed=args.calib_seed)
    windows_file, eval_file = token_files(args, n)
    res["windows_match_peer_file"] = torch.equal(windows, load_file(str(windows_file))["input_ids"])
    test = {s: tokenize_text(tok, load_text(s, "test")) for s in ("ptb", "austen")}
    exported = load_file(str(eval_file))
    res["eval_tokens_match_peer_file"] = all(torch.equal(v, exported[s]) for s, v in test.items())
    configs = load_recipe(row["recipe"]) if row["recipe"] else []
    if configs:
        check_targets(model, configs)
    steps = build_steps(configs)
    start = time.perf_counter()
    order = None if args.sequential == "auto" else args.sequential
    report = run_pipeline(model, windows, steps, batch_size=BATCH_SIZE, progress=False,
                          sequential=order, stats_precision=args.stats_precision) if steps else None
    if report:
        res["sequential"] = report["sequential"]
        res["stats_precision"] = [e["stats_precision"] for e in report["steps"]]
    res["compress_seconds"] = time.perf_counter() - start
    res["compress_peak_rss_mb"] = peak_rss_mb()
    names = (sorted({x for e in report["steps"] for x in e["layers"]}) if report
             else match_targets(model, "all-linear"))
    res["storage"] = storage_report(model, names)
    res["bits_per_weight"] = res["storage"]["bits_per_weight"]
    res["steps"] = step_summaries(report, steps, configs) if report else []
    for s, ids in test.items():
        p = perplexity(model, ids, seqlen=EVAL_SEQLEN, max_tokens=args.eval_tokens, progress=False)
        res.update({f"ppl_{s}": p["perplexity"], f"nll_{s}": p["nll"],
                    f"eval_seconds_{s}": p["seconds"]})
    prompt, window = test["ptb"][None, :GEN_PROMPT], test["ptb"][None, :512]
    with torch.inference_mode():
        def generate():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 min_new_tokens=GEN_NEW, max_new_tokens=GEN_NEW,
                                 pad_token_id=tok.eos_token_id)
            assert out.shape[1] == GEN_PROMPT + GEN_NEW, out.shape
        res["gen_tokens_per_s"] = median_rate(generate, GEN_NEW)
        res["fwd512_tokens_per_s"] = median_rate(lambda: model(window, use_cache=False), 512)
        check_ids = test["ptb"][None, 512:512 + 32]
        logits = model(check_ids, use_cache=False).logits
    res["peak_rss_mb"] = peak_rss_mb()  # compression, evaluation, speed (before save / reload)
    with tempfile.TemporaryDirectory(prefix="compress-grid-") as tmp:
        saved = save_model(model, tok, Path(tmp) / "model",
                           metadata={"source_model": MODEL, "recipe": row["recipe"]})
        res["mb_on_disk"] = bytes_on_disk(saved) / 1e6
        del model
        reloaded, _ = load_model(saved)
        with torch.inference_mode():
            again = reloaded(check_ids, use_cache=False).logits
    res["reload_identical"] = bool(torch.equal(logits, again))
    res["reload_max_abs_diff"] = (logits - again).abs().max().item()
    res["peak_rss_with_reload_mb"] = peak_rss_mb()
    res["loadavg_end"] = os.getloadavg()
    return res


def run_peer(row: dict, args, path: Path) -> bool:
    res = run_info(row, args)
    windows_file, eval_file = token_files(args, res["windows"])
    with tempfile.TemporaryDirectory(prefix="compress-grid-peer-") as tmp:
        raw, saved = Path(tmp) / "peer.json", Path(tmp) / "model"
        from slimtune.models import resolve_model_dir

        cmd = [str(PEER_PY), str(PEER_RUN), "--model", str(resolve_model_dir(MODEL)),
               "--windows", str(windows_file), "--eval", str(eval_file), "--scheme", row["scheme"],
               "--threads", str(args.threads), "--out", str(raw), "--save", str(saved),
               "--eval-seqlen", str(EVAL_SEQLEN), "--eval-tokens", str(args.eval_tokens)]
        if not run_logged(cmd, args, row):
            return False
        peer = json.loads(raw.read_text())
        mb = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 1e6
    res.update(ppl_ptb=peer["ppl"]["ptb"], ppl_austen=peer["ppl"]["austen"],
               nll_ptb=peer["nll"]["ptb"], nll_austen=peer["nll"]["austen"],
               compress_seconds=peer["compress_seconds"], peak_rss_mb=peer["peak_rss_mb"],
               mb_on_disk=mb, torch=peer["versions"]["torch"], peer=peer,
               loadavg_end=os.getloadavg())
    write_json(path, res)
    return True


def run_logged(cmd: list[str], args, row: dict) -> bool:
    log = args.out_dir / "logs" / f"{file_stem(row['name'])}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {row['name']} ({row['label']}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=thread_env(args.threads)).returncode
    print(f"  {row['name']}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
          f"{time.perf_counter() - start:.0f} s (log {log})", file=sys.stderr, flush=True)
    if rc != 0:
        print("\n".join(log.read_text().splitlines()[-25:]), file=sys.stderr)
    return rc == 0


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def print_table(rows: list[dict], results: dict[str, dict]) -> None:
    cols = ("row", "method / settings", "windows", "PTB ppl", "Austen ppl", "bits/weight",
            "MB on disk", "compress s", "peak RSS MB", "gen tok/s", "fwd 512 tok/s",
            "peer PTB / Austen ppl", "peer compress s", "ppl ratio PTB / Austen", "time ratio")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        r = results.get(row["name"])
        if r is None:
            continue
        p = results.get(row.get("peer") or "", {})
        peer_cells = ["-"] * 4 if not p else [
            f"{p['ppl_ptb']:.2f} / {p['ppl_austen']:.2f}", f"{p['compress_seconds']:.1f}",
            f"{ratio(r['ppl_ptb'], p['ppl_ptb'])} / {ratio(r['ppl_austen'], p['ppl_austen'])}",
            ratio(r["compress_seconds"], p["compress_seconds"])]
        cells = [row["name"], row["label"], str(r["windows"]), fmt(r["ppl_ptb"]),
                 fmt(r["ppl_austen"]), fmt(r.get("bits_per_weight"), ".3f"),
                 fmt(r["mb_on_disk"], ".1f"), fmt(r["compress_seconds"], ".1f"),
                 fmt(r["peak_rss_mb"], ".0f"), fmt(r.get("gen_tokens_per_s"), ".1f"),
                 fmt(r.get("fwd512_tokens_per_s"), ".0f"), *peer_cells]
        print("| " + " | ".join(cells) + " |")


def print_header(args, results: dict[str, dict]) -> None:
    import platform

    seen = lambda key: sorted({str(r.get(key, "not recorded")) for r in  # noqa: E731
                               results.values()}) or ["-"]
    load = os.getloadavg()
    print(f"# compression grid, {MODEL}, all 210 projections\n")
    print(f"- this run: {' '.join(sys.argv)}")
    print(f"- date {datetime.now().astimezone().isoformat(timespec='seconds')}, git {git_commit()},"
          f" {platform.machine()} {os.cpu_count()} CPUs, load average now "
          + " ".join(f"{x:.2f}" for x in load))
    print(f"- settings (this run): windows {args.windows}, seqlen {args.seqlen}, threads "
          f"{args.threads}, calibration seed {args.calib_seed}, eval first {args.eval_tokens} tokens of PTB test / Austen test in "
          f"windows of {EVAL_SEQLEN}, torch {version('torch')}")
    print(f"- rows present: torch {', '.join(seen('torch'))}; threads {', '.join(seen('threads'))};"
          f" seqlen {', '.join(seen('seqlen'))}; eval tokens {', '.join(seen('eval_tokens'))}; "
          f"git {', '.join(seen('git'))}; calibration seed {', '.join(seen('calib_seed'))}; "
          f"CPU {', '.join(seen('cpu'))}; 1-min load at row start "
          + ", ".join(sorted({f"{r['loadavg_start'][0]:.1f}" for r in results.values()})))
    checks = [f"{k}: {sorted({r[k] for r in results.values() if k in r})}" for k in
              ("windows_match_peer_file", "eval_tokens_match_peer_file", "reload_identical")]
    print(f"- checks over own rows: {'; '.join(checks)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default=".", help="regex (re.search) on row names")
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sequential", choices=("auto", "layer", "block"), default="auto",
                    help="run_pipeline's order (own rows; auto: the steps' choice, recorded per "
                    "row; use another --out-dir for a forced order)")
    ap.add_argument("--stats-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="run_pipeline's block-order statistics forward (own rows; the choice "
                    "per step is recorded per row)")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed of the calibration windows (use one --out-dir per seed)")
    ap.add_argument("--skip-peer", action="store_true", help="leave out the llm-compressor rows")
    ap.add_argument("--redo", action="store_true", help="run rows whose JSON exists again")
    ap.add_argument("--table-only", action="store_true", help="only print the table")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out_dir = args.out_dir.resolve()
    rows = grid()
    by_name = {r["name"]: r for r in rows}
    if args.one:
        write_json(args.out_dir / f"{file_stem(args.one)}.json", run_ours(by_name[args.one], args))
        return
    selected = [r for r in rows if re.search(args.rows, r["name"])
                and not (args.skip_peer and r["kind"] == "peer")]
    if not selected:
        ap.error(f"--rows {args.rows!r} matches none of: {', '.join(by_name)}")
    path = lambda r: args.out_dir / f"{file_stem(r['name'])}.json"  # noqa: E731
    todo = [] if args.table_only else [r for r in selected if args.redo or not path(r).exists()]
    for n in sorted({r["windows"] or args.windows for r in todo}):
        export_tokens(args, n)
    failed = []
    for row in todo:
        if row["kind"] == "ours":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", row["name"],
                   "--windows", str(args.windows), "--seqlen", str(args.seqlen), "--threads",
                   str(args.threads), "--eval-tokens", str(args.eval_tokens),
                   "--out-dir", str(args.out_dir), "--sequential", args.sequential,
                   "--stats-precision", args.stats_precision,
                   "--calib-seed", str(args.calib_seed)]
            ok = run_logged(cmd, args, row)
        else:
            ok = run_peer(row, args, path(row))
        if not ok:
            failed.append(row["name"])
    results = {r["name"]: json.loads(path(r).read_text()) for r in rows if path(r).exists()}
    for r in selected:
        old = results.get(r["name"])
        keys = ("windows", "seqlen", "eval_tokens", "threads", "calib_seed")
        want = (r["windows"] or args.windows, args.seqlen, args.eval_tokens, args.threads,
                args.calib_seed)
        if old and tuple(old.get(k, 0) for k in keys) != want and not args.table_only:
            print(f"note: {r['name']} kept from a run with "
                  + ", ".join(f"{k} {old[k]}" for k in keys) + " (--redo to rerun it)",
                  file=sys.stderr)
    print_header(args, results)
    print_table(rows, results)
    print("\n## orderings (PTB ppl; rows absent are not judged)\n")
    print("\n".join(f"- {line}" for line in orderings(results)) or "- (no rows to compare)")
    if failed:
        print(f"\nFAILED rows (no JSON written): {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
