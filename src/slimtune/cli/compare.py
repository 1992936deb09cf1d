"""``slimtune compare``: fine-tuned versions of one base model, side by side.

Argument checking and printing only; the analysis is :func:`slimtune.analyze.compare.run_compare`
and the files :func:`slimtune.analyze.compare_report.write_report`. Every argument (the base, each
model and, for an adapter, the base it was trained on, the text, the numbers, the output
directory) is checked before any model is loaded.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from slimtune.cli.app import (MODEL_HELP, adapter_dir, base_model_of, check_output, command, fail,
                              load_or_fail, model_label, stdout)

COMPARE_HELP = (
    "Compare fine-tuned versions of one base model: intruder dimensions, update spectra, "
    "subspace alignment, and perplexity with the Matrix Nuclear-Norm.\n\n"
    "Each model is a Hugging Face model directory (e.g. a full fine-tune) or a slimtune adapter "
    "directory (adapter.json) trained on --base, merged into a copy of it. Per linear layer: "
    "the intruder dimensions of the tuned weight W_t (top --k left singular vectors whose best "
    "|cos| with every singular vector of the base W_0 is below --epsilon; Shuttleworth et al. "
    "2024), the singular values, effective and stable rank and energy at rank 8/32/128 of "
    "ΔW = W_t - W_0, and the alignment (Σcos²θ/k of the principal angles) of ΔW's top "
    "--align-k singular subspaces with W_0's and with the other models'. With --data: perplexity "
    "and Matrix Nuclear-Norm (Li et al. 2024) of the base and of each model on the same windows "
    "of the first --eval-tokens tokens of the test split.\n\n"
    "Writes OUT/compare.json, OUT/layers.csv, OUT/intruders.png, OUT/delta_spectra.png and "
    "OUT/alignment.png. Example: slimtune compare --base smollm2-135m --models out/lora "
    "out/full --data ptb --out out/compare")


def check_models(base: str, paths: list[str]) -> dict[str, str]:
    """``{label: path}`` after checking every model against the base (no weights are read)."""
    from slimtune.adapt import read_manifest
    from slimtune.analyze.compare import model_identity
    from slimtune.models import ModelNotFoundError, check_model_name, model_skeleton

    try:
        base_config = model_skeleton(base).config.to_dict()
    except (ModelNotFoundError, OSError, ValueError) as err:
        fail(f"--base: {err}")
    labels: dict[str, str] = {}
    seen = set()
    for path in paths:
        where = f"--models {path}"
        resolved = str(Path(path).expanduser().resolve())
        if resolved in seen:
            fail(f"{where}: given twice")
        seen.add(resolved)
        adapter = adapter_dir(path)
        if adapter is not None:
            try:
                trained_on = base_model_of(read_manifest(adapter), adapter)
            except (OSError, ValueError) as err:
                fail(f"{where}: {err}")
            if model_identity(trained_on) != model_identity(base):
                fail(f"{where}: the adapter was trained on {trained_on}, not on --base {base}")
        else:
            directory = Path(path).expanduser()
            if directory.is_dir() and not (directory / "config.json").is_file():
                fail(f"{where}: not a model directory or an adapter directory (no config.json "
                     "or adapter.json)")
            try:
                check_model_name(path)
                config = model_skeleton(path).config.to_dict()
            except (ModelNotFoundError, OSError, ValueError) as err:
                fail(f"{where}: {err}")
            for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                        "vocab_size"):
                if config.get(key) != base_config.get(key):
                    fail(f"{where}: {key} {config.get(key)!r} differs from the base's "
                         f"{base_config.get(key)!r}: not a fine-tune of {base}")
        label, n = model_label(path), 2
        while label in labels:
            label, n = f"{model_label(path)}-{n}", n + 1
        labels[label] = path
    return labels


def read_text(data: str, split: str) -> str:
    from slimtune.data import check_text_source, load_text

    try:
        check_text_source(data, split)
        return load_text(data, split)
    except (ValueError, FileNotFoundError) as err:
        fail(f"--data: {err}")


@command("compare", help=COMPARE_HELP)
def compare_command(
    base: str = typer.Option(..., "--base", "-b", help=MODEL_HELP),
    models: List[str] = typer.Option(..., "--models", "-m", help="Fine-tuned models of --base: "
                                     "model or adapter directories (--models A B C, or repeat "
                                     "--models)."),
    more: Optional[List[str]] = typer.Argument(None, metavar="MODELS", show_default=False,
                                               help="More models (what follows --models A)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Text for perplexity and "
                                       "Matrix Nuclear-Norm: a registered data set (ptb, austen, "
                                       "finefoods-text) or a UTF-8 text file (its last tenth of "
                                       "lines is the test split). Causal LMs only; none: weights "
                                       "only."),
    split: str = typer.Option("test", help="Split of --data to score."),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", min=2,
                                    help="Score the first N tokens of the split."),
    seqlen: int = typer.Option(512, min=2, help="Window length in tokens."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Windows per forward pass."),
    k: int = typer.Option(10, "--k", min=1, help="Intruder test: how many top singular vectors "
                          "of each tuned weight are tested."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Intruder test: a top vector whose best "
                                  "|cos| with the base's singular vectors is below this, in "
                                  "(0, 1]."),
    align_k: int = typer.Option(16, "--align-k", min=1, help="Dimension of the singular "
                                "subspaces compared by principal angles."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       show_default="./out/compare-<base-name>",
                                       help="Output directory (files in it are replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on "
                                 "stdout instead of a table."),
) -> None:
    """Validate everything, load the base, analyse each model, write, print."""
    from slimtune.models import ModelNotFoundError, check_model_name, is_causal_lm, \
        model_architectures

    if adapter_dir(base) is not None:
        fail(f"--base {base} is an adapter directory; give the model it was trained on")
    try:
        check_model_name(base)
    except ModelNotFoundError as err:
        fail(f"--base: {err}")
    if not 0 < epsilon <= 1:
        fail(f"--epsilon must be in (0, 1], got {epsilon}")
    labels = check_models(base, [*models, *(more or [])])
    text = None
    if data is not None:
        if not is_causal_lm(model_architectures(base)):
            fail(f"--data: {base} is not a causal language model; perplexity and the Matrix "
                 "Nuclear-Norm need one (drop --data to compare weights only)")
        if eval_tokens < seqlen:
            fail(f"--eval-tokens {eval_tokens} is less than --seqlen {seqlen}: no complete window")
        text = read_text(data, split)
    out = out if out is not None else Path("out") / f"compare-{model_label(base)}"
    check_output(out, 16 * 2 ** 20, resume=True)

    from slimtune.analyze.compare import CompareSettings, run_compare
    from slimtune.analyze.compare_report import write_report
    from slimtune.evaluate import tokenize_text

    settings = CompareSettings(k=k, epsilon=epsilon, align_k=align_k)
    start = time.perf_counter()
    base_model, tokenizer = load_or_fail(base)
    ids = tokenize_text(tokenizer, text) if text is not None else None
    if ids is not None and ids.numel() < seqlen:
        fail(f"--data {data} ({split}) has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    result = run_compare(base_model, labels, settings, ids, seqlen=seqlen, eval_tokens=eval_tokens,
                         batch_size=batch_size, progress=True)
    where = None if data is None else {"data": data, "split": split, "eval_tokens": eval_tokens,
                                       "seqlen": seqlen}
    paths = write_report(result, out, base, where)
    seconds = time.perf_counter() - start
    if as_json:
        print(json.dumps({"base": base, "out": str(out), "files": {name: str(path) for name, path in
                          paths.items()}, "summary": result["summary"],
                          "eval": _eval_summary(result["eval"]), "seconds": seconds}))
        return
    stdout.print(summary_table(base, result, settings))
    stdout.print(f"wrote {', '.join(paths)} into {out} in {seconds:.0f} s")


def _eval_summary(evals: dict) -> dict:
    return {label: None if e is None else {key: e[key] for key in ("perplexity", "nuclear_norm",
                                                                   "tokens", "windows")}
            for label, e in evals.items()}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def summary_table(base: str, result: dict, settings) -> Table:
    table = Table(title=f"fine-tunes of {base}")
    table.caption = (f"intruders: top-{settings.k} singular vectors of W_t whose best |cos| with "
                     f"W₀'s is < {settings.epsilon:g} (in how many layers); ΔW/W₀: Frobenius, over "
                     "all layers; erank: median effective rank of ΔW; E@8: mean energy of ΔW at "
                     f"rank 8; align: mean Σcos²θ/{settings.align_k} of ΔW's top subspaces vs "
                     "W₀'s, left/right; MNN: Matrix Nuclear-Norm. More in compare.json, layers.csv")
    table.add_column("model", overflow="fold")
    for column in ("intruders", "ΔW/W₀", "erank", "E@8", "align L/R", "ppl", "MNN"):
        table.add_column(column, justify="right", no_wrap=True)
    evals = result["eval"]
    base_eval = next(iter(evals.values()))
    if base_eval is not None:
        table.add_row("(base)", "", "", "", "", "", _fmt(base_eval["perplexity"], ".2f"),
                      _fmt(base_eval["nuclear_norm"], ".4f"))
    for label, s in result["summary"].items():
        e = evals.get(label)
        align = "/".join(_fmt(s[f"align_base_{side}_mean"], ".3f") for side in ("left", "right"))
        table.add_row(label, f"{s['intruders']} ({s['layers_with_intruders']})",
                      _fmt(s["relative_change"], ".4f"),
                      _fmt(s["delta_effective_rank_median"], ".1f"),
                      _fmt(s["energy_r8_mean"], ".3f"), align,
                      _fmt(e and e["perplexity"], ".2f"), _fmt(e and e["nuclear_norm"], ".4f"))
    return table
