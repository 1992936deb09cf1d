"""Fine-tuning quality of every adapter method, plus no training and full fine-tuning.

Each row runs in its own subprocess (so peak RSS is its own) and is one call of
:func:`slimtune.train.train` (the library's loop: AdamW, warmup-free cosine decay to 0, gradient
norm clipped to 1.0, weight decay 0, seed 0) with r=16, alpha=32 (SVFit and SORSA ignore alpha),
targets all-linear, and the learning rate of the method in ``LR`` below. Data-driven methods
(``needs_calibration``) are calibrated on --calib-n windows of the training data (seeded).

``--task austen`` (default): SmolLM2-135M, --steps (100) steps of --batch × --seqlen (4 × 128)
random Austen-train windows (the same windows, in the same order, for every row). Then Austen-test
perplexity (the fine-tuning task) and PTB-test perplexity (forgetting: text the model was not tuned
on) on the first --eval-tokens (8192) tokens of each, windows of --eval-seqlen (512) tokens.

``--task finefoods``: all-MiniLM-L6-v2 with a mean-pooling classification head (trained in full
next to the adapter), the first --train-examples (1,000) finefoods training reviews truncated to
--seqlen (128) tokens, --epochs (1) epoch(s) in batches of --batch (16): ceil(1000 × 1 / 16) = 63
steps, so the last batch takes 8 reviews of the next epoch's order. Then accuracy on the first
--eval-examples (1,000: all) test reviews. The ``none`` row is the untrained classifier (seeded
random head): chance level, the floor of the table.

Rows ``full-galore``, ``full-fira``, ``full-lion`` (Austen only) fine-tune every weight with that
optimiser instead of AdamW (keys in ``VARIANTS``).

Columns: method, lr, trainable parameters, adapter KB on disk (adapter.safetensors + adapter.json
as the loop writes it; rows stored before issue #16 have none), median step seconds (wall time: run on a quiet
machine), peak RSS (MB, of the row's process at the end of training; ``none``: after evaluation),
optimiser-state MB (every tensor of its state_dict at the end; rows stored before issue #15 have
none),
the task metric(s), and the training loss at steps 10, 50 and the last (single batches, but the
same batch for every row at a given step, so rows compare directly: convergence speed; step 1 is
the same for every method, as each starts as the base model), and the mean training loss over the
first quarter of the steps and over all of them. The whole loss curve is stored.

Rows of adapters also store each saved layer's rank (``ranks``: after AdaLoRA's and SoRA's
pruning, IncreLoRA's growth) and any schedule parameters (``params``, from ``SCHEDULES``).

Results are appended to a JSON-lines file (one line per row); rows already there with the same
task, method, lr, settings and params are skipped, so an interrupted grid resumes where it stopped.
``--lr METHOD=VALUE`` overrides a learning rate for this invocation (stored rows keep theirs; the
table shows every stored row of the task and settings, e.g. a pissa row at 2e-5 and one at 2e-4).

    .venv/bin/python benchmarks/bench_adapt_quality.py [--task austen|finefoods]
        [--methods none lora ... full] [--lr pissa=2e-4 ...] [--steps 100] [--batch 4]
        [--seqlen 128] [--calib-n 16] [--eval-tokens 8192] [--eval-seqlen 512]
        [--train-examples 1000] [--epochs 1] [--eval-examples 1000]
        [--layers N (first N blocks only; smoke tests)] [--results FILE] [--table]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import append_row, first_blocks, read_rows

DEFAULT_RESULTS = Path(__file__).with_name("results") / "adapt_quality.jsonl"

# One peak learning rate per method. Where the method's paper or reference code gives one, it is
# used (at that work's model scale and batch size, not tuned for these small runs); otherwise the
# common LoRA-family value 2e-4. Compare rows knowing that the learning rates differ (--lr adds rows
# at other rates).
LR = {
    # LoRA (Hu et al. 2021): the paper's rates vary per task (GPT-2 E2E 2e-4, RoBERTa 4e-4 - 5e-4);
    # 2e-4 is the common default (QLoRA, PEFT examples). The DoRA README trains LoRA at 3e-4.
    "lora": 2e-4,
    # DoRA: NVlabs/DoRA commonsense_reasoning/README.md, LLaMA-7B and LLaMA2-7B at r=16: 2e-4.
    "dora": 2e-4,
    # PiSSA: GraphPKU/PiSSA scripts (e.g. scripts/metamath_llama2_7b/run_pissa.sh): 2e-5, the
    # rate of the paper's full fine-tuning and LoRA baselines too (batch 128, 3% warmup, cosine).
    "pissa": 2e-5,
    # MiLoRA: not verified here; common 2e-4.
    "milora": 2e-4,
    # OLoRA: not verified here; common 2e-4.
    "olora": 2e-4,
    # SVFit (trains only r singular values per layer, scale 1): not verified here; common 2e-4.
    "svfit": 2e-4,
    # SORSA: Gunale0926/SORSA scripts/train_sorsa.sh: 3e-5 (gamma 4e-4, the config's default;
    # the same repository trains PiSSA and LoRA at 2e-5).
    "sorsa": 3e-5,
    # CorDA: the reference training script (iboing/CorDA tools/train_CorDA.sh) is not in our
    # index, so not verified here; common 2e-4.
    "corda": 2e-4,
    # CorDA's knowledge-preserved mode: as ipm.
    "corda-kpm": 2e-4,
    # EVA: ml-jku/EVA bash/run_train.sh: 5e-4 (one rate for EVA and all its baselines).
    "eva": 5e-4,
    # Issue #16's methods: the authors' rate where their scripts give one (read in session 21;
    # for decoder LMs the instruction/math tuning setting, else the largest task), else the
    # common 2e-4 for methods that train whole factors and 4e-3, twenty times that, for methods
    # that train only vectors, cores or coefficients (their updates move the output far less per
    # unit of lr; not tuned: other rates are rows added with --lr).
    "vera": 4e-3,      # no reference code; the paper's table not read here; vectors only
    "nola": 1e-3,      # UCDvision/NOLA llama/scripts/finetune_llama2_alpaca_7b_nola.sh
    "lora_xs": 4e-3,   # MohammadrezaBanaei/LoRA-XS scripts/run_instruction_tuning.sh (Mistral-7B)
    "lora_sb": 1e-4,   # RaghavSinghal10/lora-sb train_arithmetic.py's default (run_it.sh,
                       # Mistral-7B)
    "loldu": 4e-3,     # SKDDJ/LoLDU has no training scripts; a diagonal only
    "miss": 2e-5,      # JL-er/MiSS scripts/math/run_miss.sh (Qwen3-4B; PEFT's example too)
    "adalora": 5e-4,   # QingruZhang/AdaLoRA NLG_QA/scripts/run_bart_xsum.sh (BART-large)
    "dylora": 5e-4,    # huawei-noah/Efficient-NLP DyLoRA/examples/NLU roberta_base_mnli.sh
    "sora": 8e-4,      # TsinghuaC3I/SoRA GLUE script (as read for adapt/sora.py)
    "sora-sched": 8e-4,
    "increlora": 5e-4,  # FeiyuZhang98/IncreLoRA NLG_QA/scripts/run_bart_xsum.sh (BART-large)
    "sft": 1e-5,       # ducdauge/sft-llm scripts/finetune_peft_with_accelerate.sh (LLaMA-2)
    "sara": 5e-4,      # the reference's default 1e-3·exp(-350·threshold) at its threshold
    "dsee": 5e-4,      # the reference's RTE script
    "allora": 2e-4,    # no reference code or rate found; eta = 10 is this project's choice
    "ggpo": 2e-4,      # the reference repository (llm172/LoRA-GGPO) is not reachable here
    "ba_lora": 2e-5,   # cyp-jlu-ai/BA-LoRA scripts/ba-lora.sh (LLaMA-2-7B; llm172/BA-LoRA too)
    # Full fine-tuning: 2e-5, the usual rate for full fine-tuning of LMs and BERT-family encoders
    # (and PiSSA's full-FT baseline).
    "full": 2e-5,
    # Full fine-tuning with other optimisers (issue #15): GaLore and Fira at full fine-tuning's
    # rate with rank 128 and scale 1 (the GaLore paper fine-tunes at 1e-5 - 3e-5 with its own
    # scale per task; 0.25 is its pretraining scale); Lion at a quarter of AdamW's rate (the Lion
    # paper: 3-10x smaller than AdamW's).
    "full-galore": 2e-5,
    "full-fira": 2e-5,
    "full-lion": 5e-6,
}
# Methods whose schedule is counted in steps get one scaled to the run (their defaults assume
# thousands of steps, and a schedule that never fires is refused): IncreLoRA grows every tenth
# of the run after the first tenth; AdaLoRA keeps its initial budget for the first tenth and
# its final one for the last fifth (PEFT's examples use such phases; no paper value at 100 steps).
SCHEDULES = {"increlora": lambda steps: {"warmup": max(1, steps // 10),
                                         "interval": max(1, steps // 10)},
             "adalora": lambda steps: {"tinit": steps // 10, "tfinal": steps // 5}}
MODELS = {"austen": "smollm2-135m", "finefoods": "minilm-l6"}
# Rows that are a registered method with other parameters: CorDA's knowledge-preserved adaptation
# (kpm) collects its covariance from the knowledge to keep -- here PTB train (austen task only),
# as the paper uses world-knowledge QA data -- and adapts the r least-used context directions;
# PTB test then measures what it kept.
# sora-sched: SoRA with its paper's sparsifying scheduler, λ rising linearly from 0.375 to 50
# over the run, sized so that gates reach zero within 100 steps (Σ η_t·λ_t ≈ 0.6 at 8e-4 under
# the cosine decay; gates start N(0, 1)); at the constant default λ they shrink by ~0.015.
VARIANTS = {"corda-kpm": {"method": "corda", "params": {"mode": "kpm"}, "calib_data": "ptb"},
            "sora-sched": {"method": "sora", "params": {"lambda_end": 50.0}},
            **{f"full-{name}": {"method": "full", "params": {}, "optimizer": name,
                                "optimizer_params": keys}
               for name, keys in (("galore", {"rank": 128, "update_proj_gap": 200, "scale": 1.0}),
                                  ("fira", {"rank": 128, "update_proj_gap": 200, "scale": 1.0}),
                                  ("lion", {}))}}


def settings(args) -> dict:
    s = {"seqlen": args.seqlen, "batch": args.batch, "calib_n": args.calib_n, "r": 16,
         "alpha": 32.0, "seed": 0, "layers": args.layers}
    if args.task == "austen":
        return {**s, "steps": args.steps, "eval_tokens": args.eval_tokens,
                "eval_seqlen": args.eval_seqlen}
    steps = math.ceil(args.train_examples * args.epochs / args.batch)
    return {**s, "steps": steps, "train_examples": args.train_examples, "epochs": args.epochs,
            "eval_examples": args.eval_examples}


def train_config(task: str, s: dict, lr: float, calib_data: str | None = None,
                 optimizer: str = "adamw", optimizer_params: dict | None = None):
    from slimtune.train import make_train_config

    common = dict(data=task, steps=s["steps"], batch=s["batch"], seqlen=s["seqlen"], lr=lr,
                  calib_n=s["calib_n"], calib_data=calib_data, seed=s["seed"],
                  optimizer=optimizer, optimizer_params=optimizer_params or {})
    if task == "austen":  # one window: the loop's own final evaluation (at the training seqlen)
        return make_train_config(**common, eval_tokens=s["seqlen"])  # is not used (run_one)
    return make_train_config(**common, eval_examples=s["eval_examples"])


def limit_training_set(task, n: int, seed: int) -> None:
    """Train on the first ``n`` reviews only (ClassificationTask has no option for it)."""
    import torch

    from slimtune.train.tasks import EpochOrder

    if n > len(task.texts):
        raise ValueError(f"--train-examples {n} exceeds the {len(task.texts)} training reviews")
    task.texts, task.labels = task.texts[:n], task.labels[:n]
    task.order = EpochOrder(lambda g: torch.randperm(n, generator=g), seed)


def run_one(job: dict) -> dict:
    """Train (or not) and measure one row in this process."""
    import torch

    from slimtune.adapt.registry import make_config
    from slimtune.data import load_text
    from slimtune.evaluate import peak_rss_mb, perplexity, tokenize_text
    from slimtune.models import load_model
    from slimtune.train import build_task, train

    task_name, method, lr, s = job["task"], job["method"], job["lr"], job["settings"]
    row = {"task": task_name, "method": method, "lr": lr, "settings": s}
    if job.get("params"):
        row["params"] = job["params"]
    model, tok = load_model(MODELS[task_name])
    if s["layers"]:
        first_blocks(model, s["layers"])
    variant = VARIANTS.get(method, {"method": method, "params": {}})
    config = train_config(task_name, s, lr if lr is not None else 1e-4,
                          variant.get("calib_data"), variant.get("optimizer", "adamw"),
                          variant.get("optimizer_params"))
    task = build_task(config, tok)
    if task_name == "finefoods":
        limit_training_set(task, s["train_examples"], s["seed"])
    start = time.perf_counter()
    if method == "none":
        model = task.prepare_model(model, seed=s["seed"])
        row.update(trainable=0, step_s=None, losses=[])
    else:
        adapter = None if variant["method"] == "full" else make_config(
            variant["method"], **{"r": s["r"], "alpha": s["alpha"], "seed": s["seed"],
                                  **variant["params"], **job.get("params", {})})
        with tempfile.TemporaryDirectory() as tmp:
            model, history = train(model, task, config, Path(tmp) / "run", adapter=adapter,
                                   progress=False)
            if adapter is not None:  # what the adapter costs on disk (safetensors + json)
                run = Path(tmp) / "run"
                row["adapter_bytes"] = sum(f.stat().st_size for f in run.iterdir()
                                           if f.name.startswith("adapter."))
                row["ranks"] = saved_ranks(run)
        row.update(trainable=history["trainable_parameters"],
                   step_s=history["seconds_per_step"], peak_rss_mb=history["peak_rss_mb"],
                   optimizer_state_mb=history.get("optimizer_state_mb"),
                   losses=[r["loss"] for r in history["steps"]],
                   extra_losses=[r.get("extra_loss") for r in history["steps"]])
        if task_name == "finefoods":
            row["accuracy"] = history["final_eval"]["accuracy"]
    row["train_wall_s"] = time.perf_counter() - start
    model.eval()
    if task_name == "austen":
        for data in ("austen", "ptb"):
            ids = tokenize_text(tok, load_text(data, "test"))
            res = perplexity(model, ids, seqlen=s["eval_seqlen"], max_tokens=s["eval_tokens"],
                             batch_size=4, progress=False)
            row[f"ppl_{data}"] = res["perplexity"]
    elif method == "none":
        row["accuracy"] = task.evaluate(model)["accuracy"]
    row.setdefault("peak_rss_mb", peak_rss_mb())
    row.update(torch=torch.__version__, threads=torch.get_num_threads(),
               load_average=os.getloadavg()[0])
    return row


def saved_ranks(run: Path) -> dict[str, int]:
    """The rank of every saved layer's low-rank part (after pruning or growth), from the
    adapter's manifest; layers with no low-rank part are left out."""
    from slimtune.adapt import read_manifest

    layers = read_manifest(run)["layers"]
    return {name: d["lowrank"]["rank"] for name, d in layers.items() if d.get("lowrank")}


def key(row: dict) -> tuple:
    return (row["task"], row["method"], row["lr"], json.dumps(row["settings"], sort_keys=True),
            json.dumps(row.get("params") or {}, sort_keys=True))


def loss_steps(steps: int) -> list[int]:
    return [k for k in (10, 50) if k < steps] + [steps]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], task: str, steps: int) -> None:
    at = loss_steps(steps)
    metric = ("Austen ppl", "PTB ppl") if task == "austen" else ("accuracy",)
    early = max(1, steps // 4)
    cols = ("method", "lr", "trainable", "adapter KB", "step s", "peak RSS MB",
            "optimiser state MB", *metric,
            *[f"loss@{k}" for k in at], f"mean loss 1-{early}", f"mean loss 1-{steps}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        losses = r["losses"]
        values = ([fmt(r.get("ppl_austen"), ".2f"), fmt(r.get("ppl_ptb"), ".2f")]
                  if task == "austen" else [fmt(r.get("accuracy"), ".3f")])
        loss_cells = [fmt(losses[k - 1] if len(losses) >= k else None, ".4f") for k in at]
        loss_cells += [fmt(sum(losses[:n]) / n if len(losses) >= n else None, ".4f")
                       for n in (early, steps)]
        kb = None if r.get("adapter_bytes") is None else r["adapter_bytes"] / 1024
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
        name = f"{r['method']} ({params})" if params else r["method"]
        print(f"| {name} | {fmt(r['lr'], 'g')} | {r['trainable']:,} | {fmt(kb, ',.0f')} | "
              f"{fmt(r['step_s'], '.2f')} | {r['peak_rss_mb']:.0f} | "
              f"{fmt(r.get('optimizer_state_mb'), '.0f')} | "
              + " | ".join(values + loss_cells) + " |")


def parse_lr(items: list[str], ap) -> dict:
    lr = dict(LR)
    for item in items:
        name, _, value = item.partition("=")
        try:
            lr[name] = float(value)
        except ValueError:
            ap.error(f"--lr takes METHOD=VALUE, got {item!r}")
        if lr[name] <= 0:
            ap.error(f"--lr {item}: the learning rate must be > 0")
    return lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=sorted(MODELS), default="austen")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="rows to run (default: none, every registered method, full)")
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=VALUE",
                    help="override the learning rate of a method for this invocation")
    ap.add_argument("--steps", type=int, default=100, help="austen: optimiser steps")
    ap.add_argument("--batch", type=int, default=None, help="austen 4, finefoods 16")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--train-examples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=None,
                    help="only the first N blocks (smoke tests)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="only print the table of stored results")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.batch is None:
        args.batch = 4 if args.task == "austen" else 16

    from slimtune.adapt import known_methods

    variants = list(VARIANTS) if args.task == "austen" else []
    methods = args.methods or ["none", *known_methods(), *variants, "full"]
    lr = parse_lr(args.lr, ap)
    unknown = [m for m in methods if m not in ("none", "full", *known_methods(), *VARIANTS)]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: none, full, {', '.join(known_methods())}")
    missing = [m for m in methods if m != "none" and m not in lr]
    if missing and not args.table:
        ap.error(f"no learning rate for {missing}: add a documented entry to LR in {__file__} "
                 "(or pass --lr METHOD=VALUE)")
    s = settings(args)
    jobs = [{"task": args.task, "method": m, "lr": None if m == "none" else lr.get(m), "settings": s,
             "params": SCHEDULES[m](s["steps"]) if m in SCHEDULES else {}} for m in methods]
    done = {key(row): row for row in read_rows(args.results)}
    print(f"# {os.path.basename(sys.executable)} {' '.join(sys.argv)}  (task {args.task}, "
          f"settings {json.dumps(s)}; load average {os.getloadavg()[0]:.2f})", flush=True)
    for job in jobs:
        k = key(job)
        if k in done or args.table:
            continue
        print(f"running {job['method']} (lr {job['lr']})", file=sys.stderr, flush=True)
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            print(f"FAILED {job['method']}:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        append_row(args.results, row)
        done[k] = row
        print(f"  done in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    order = {m: i for i, m in enumerate(["none", *known_methods(), *VARIANTS, "full"])}
    rows = sorted((r for r in done.values() if r["task"] == args.task
                   and json.dumps(r["settings"], sort_keys=True) == json.dumps(s, sort_keys=True)),
                  key=lambda r: (order.get(r["method"], len(order)), r["lr"] or 0))
    print_table(rows, args.task, s["steps"])


if __name__ == "__main__":
    main()
