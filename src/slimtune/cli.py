"""The ``slimtune`` command line: argument parsing, input validation and printing only.

The work lives in :mod:`slimtune.evaluate` and :mod:`slimtune.analyze`. Bad input (unknown model,
data set, split, missing file) prints one ``error: ...`` line on stderr and exits with code 2, before
anything heavy is loaded. Progress bars go to stderr, so ``--json`` output on stdout stays parseable.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="slimtune",
    help="Adapt and compress pretrained models by factoring their weight matrices.\n\n"
         "Models: smollm2-135m, minilm-l6, or a local Hugging Face model directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
stdout = Console()
stderr = Console(stderr=True)

MODEL_HELP = "Registered model name (smollm2-135m, minilm-l6) or a local Hugging Face model directory."


def fail(message: str) -> None:
    """Print one error line on stderr and exit with code 2 (bad input)."""
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def check_model(name: str) -> None:
    from slimtune.models import ModelNotFoundError, check_model_name

    try:
        check_model_name(name)
    except ModelNotFoundError as err:
        fail(str(err))


def check_data(data: str, split: str) -> Optional[Path]:
    """Validate ``--data``/``--split``; return the text file's path, or None for a registered name."""
    from slimtune.data import TEXT_DATASETS

    if data in TEXT_DATASETS:
        if split not in TEXT_DATASETS[data]:
            fail(f"data set {data!r} has no split {split!r}: use one of "
                 f"{', '.join(TEXT_DATASETS[data])}")
        return None
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if path.exists():
        fail(f"{path} is not a file")
    looks_like_path = "/" in data or "\\" in data or path.suffix != ""
    if looks_like_path:
        fail(f"text file {path} does not exist")
    fail(f"unknown data set {data!r}: use one of {', '.join(TEXT_DATASETS)} or a UTF-8 text file path")


def model_label(name: str) -> str:
    """A short name for output paths: the registered name, or the directory's name."""
    return Path(name.rstrip("/\\")).name or "model"


def load_or_fail(name: str):
    from slimtune.models import ModelNotFoundError, load_model

    try:
        return load_model(name)
    except ModelNotFoundError as err:
        fail(str(err))


EVAL_HELP = (
    "Perplexity of a causal LM on a text split, with speed and memory.\n\n"
    "The split is tokenized once (no special tokens added) and its first --max-tokens tokens are cut "
    "into non-overlapping windows of --seqlen tokens (the incomplete tail is dropped). Every "
    "next-token prediction inside a window is scored (seqlen-1 per window); perplexity = "
    "exp(mean NLL). Example: slimtune eval --model smollm2-135m --data ptb --max-tokens 20480 --json")

INSPECT_HELP = (
    "Singular-value spectra of every linear weight (embeddings and LM head excluded).\n\n"
    "Prints per layer: shape, stable rank, effective rank (spectral entropy) and the fraction of "
    "squared Frobenius norm kept at rank 8/32/128. Writes OUT/spectra.png (normalised spectra "
    "sigma_i/sigma_1 per layer type, coloured by depth) and OUT/layers.json.")


@app.command("eval", help=EVAL_HELP)
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", "-d",
                             help="Registered text data set (ptb, austen) or a path to a UTF-8 text "
                                  "file (the whole file is the split; --split is then ignored)."),
    split: str = typer.Option("test", help="Split of a registered data set (ptb: train/valid/test, "
                                           "austen: train/test)."),
    seqlen: int = typer.Option(512, min=2, help="Window length in tokens; each window scores "
                                                "seqlen-1 next-token predictions."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                             help="Use only the first N tokens of the split "
                                                  "(default: all). The incomplete last window is dropped."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Validate, load, score with :func:`slimtune.evaluate.perplexity`, print."""
    check_model(model)
    text_file = check_data(data, split)
    if max_tokens is not None and max_tokens < seqlen:
        fail(f"--max-tokens {max_tokens} is less than --seqlen {seqlen}: no complete window to score")
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            fail(f"cannot read {text_file} as UTF-8 text: {err}")
    else:
        from slimtune.data import load_text

        try:
            text = load_text(data, split)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))

    from slimtune.evaluate import parameter_count, perplexity, tokenize_text

    start = time.perf_counter()
    lm, tokenizer = load_or_fail(model)
    load_seconds = time.perf_counter() - start
    if not any(a.endswith("ForCausalLM") for a in (lm.config.architectures or [])):
        fail(f"model {model!r} ({type(lm).__name__}) is not a causal language model: "
             "perplexity needs one (e.g. smollm2-135m)")
    ids = tokenize_text(tokenizer, text)
    try:
        result = perplexity(lm, ids, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size,
                            progress=True)
    except ValueError as err:
        fail(str(err))
    import torch

    report = {"model": model, "data": str(text_file) if text_file else data,
              "split": None if text_file else split, "parameters": parameter_count(lm),
              "max_tokens": max_tokens, "batch_size": batch_size, "split_tokens": ids.numel(),
              **result, "load_seconds": load_seconds, "torch_threads": torch.get_num_threads()}
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"{model} on {report['data']}" + (f" ({split})" if split and not text_file else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = {"perplexity": f"{result['perplexity']:.3f}", "mean NLL (nats/token)": f"{result['nll']:.4f}",
             "scored tokens": f"{result['tokens']:,}",
             "windows × seqlen": f"{result['windows']} × {result['seqlen']}",
             "tokens/s": f"{result['tokens_per_s']:.1f}", "scoring time (s)": f"{result['seconds']:.1f}",
             "peak RSS (MB)": f"{result['peak_rss_mb']:.0f}", "parameters": f"{report['parameters']:,}"}
    for key, value in shown.items():
        table.add_row(key, value)
    stdout.print(table)


@app.command("inspect", help=INSPECT_HELP)
def inspect_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       show_default="./out/inspect-<model-name>",
                                       help="Output directory for spectra.png and layers.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Validate, load, compute :func:`slimtune.analyze.spectra.layer_spectra`, plot, print."""
    check_model(model)
    out = out if out is not None else Path("out") / f"inspect-{model_label(model)}"
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")

    from slimtune.analyze.spectra import layer_spectra, plot_spectra, rows_as_json, write_spectra_json

    network, _ = load_or_fail(model)
    rows = layer_spectra(network, progress=True)
    png = plot_spectra(rows, out / "spectra.png", title=f"{model_label(model)}: σ_i / σ_1")
    table_json = write_spectra_json(rows, out / "layers.json")
    if as_json:
        print(json.dumps({"model": model, "plot": str(png), "table": str(table_json),
                          "layers": rows_as_json(rows)}))
        return
    table = Table(title=f"{model}: {len(rows)} linear weights", expand=True)
    table.caption = ("srank = stable rank, erank = effective rank (spectral entropy), "
                     "E@r = energy (squared Frobenius norm) kept at rank r")
    table.add_column("layer", overflow="fold", ratio=1)  # long names fold; numbers never wrap
    for col in ("shape", "srank", "erank", "E@8", "E@32", "E@128"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["name"], "×".join(map(str, row["shape"])), f"{row['stable_rank']:.1f}",
                      f"{row['effective_rank']:.0f}", f"{row['energy_r8']:.3f}",
                      f"{row['energy_r32']:.3f}", f"{row['energy_r128']:.3f}")
    stdout.print(table)
    stdout.print(f"wrote {png} and {table_json}")


COMPRESS_HELP = (
    "Compress a model with a YAML recipe, one decoder block at a time, and save it.\n\n"
    "The recipe is a list of steps {method: NAME, targets: ..., <params>} (see recipes/). It is "
    "validated before the model is loaded. Calibration: --n random windows of --seqlen tokens "
    "from --calib (default: PTB train). OUT is written atomically (temp dir, then rename); "
    "`slimtune eval --model OUT` then evaluates the result. --merge writes an ordinary dense "
    "Hugging Face model instead of factored layers.")


@app.command("compress", help=COMPRESS_HELP)
def compress_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (must not exist "
                                                      "unless --overwrite)."),
    calib: str = typer.Option("ptb", "--calib", help="Calibration text: ptb, austen or a UTF-8 "
                                                     "text file (train split of a registered set)."),
    n: int = typer.Option(128, "--n", min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", min=2, help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing calibration windows."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Windows per block forward."),
    merge: bool = typer.Option(False, "--merge", help="Write a plain dense HF model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Validate recipe and arguments, load, calibrate, compress block by block, save."""
    from slimtune.recipe import RecipeError, build_steps, check_targets, load_recipe

    check_model(model)
    if not recipe.is_file():
        fail(f"recipe {recipe} does not exist")
    try:
        configs = load_recipe(recipe)
    except RecipeError as err:
        fail(f"{recipe}: {err}")
    if out.exists() and not overwrite:
        fail(f"--out {out} already exists (use --overwrite to replace it)")
    calib_file = check_data(calib, "train")

    from slimtune.checkpoint import save_model
    from slimtune.pipeline import calibration_windows, run_pipeline

    lm, tokenizer = load_or_fail(model)
    try:
        check_targets(lm, configs)
    except RecipeError as err:
        fail(f"{recipe}: {err}")
    try:
        windows = calibration_windows(tokenizer, data=str(calib_file or calib), split="train",
                                      n=n, seqlen=seqlen, seed=seed)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    start = time.perf_counter()
    report = run_pipeline(lm, windows, build_steps(configs), batch_size=batch_size)
    seconds = time.perf_counter() - start
    metadata = {"source_model": model, "recipe": [c.model_dump() for c in configs],
                "calibration": {"data": str(calib_file or calib), "n": n, "seqlen": seqlen,
                                "seed": seed},
                "compress_seconds": seconds}
    save_model(lm, tokenizer, out, metadata=metadata, merge=merge, overwrite=overwrite)
    from slimtune.evaluate import bytes_on_disk, parameter_count, peak_rss_mb

    stdout.print(f"compressed {model} with {recipe} in {seconds:.0f} s: "
                 f"{parameter_count(lm):,} parameters, {bytes_on_disk(out) / 1e6:.1f} MB on disk, "
                 f"peak RSS {peak_rss_mb():.0f} MB -> {out}")


from slimtune import cli_peft  # noqa: E402,F401  (registers `export-peft`)


from slimtune.cli_adapt import ADAPT_HELP, adapt_command  # noqa: E402

app.command("adapt", help=ADAPT_HELP)(adapt_command)

if __name__ == "__main__":
    app()
