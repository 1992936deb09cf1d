"""``slimtune compress``: compress a model with a YAML recipe, block by block, and save it."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from slimtune.cli.app import (MODEL_HELP, check_data, check_model, check_output, command, fail,
                              load_or_fail, stdout)


COMPRESS_HELP = (
    "Compress a model with a YAML recipe, one decoder block at a time, and save it.\n\n"
    "The recipe is a list of steps {method: NAME, targets: ..., <params>} (see recipes/). It is "
    "validated before the model is loaded. Calibration: --n random windows of --seqlen tokens "
    "from --calib (default: PTB train). OUT is written atomically (temp dir, then rename); "
    "`slimtune eval --model OUT` then evaluates the result. --merge writes an ordinary dense "
    "Hugging Face model instead of factored layers.")


@command("compress", help=COMPRESS_HELP)
def compress_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (must not exist "
                                                      "unless --overwrite)."),
    calib: str = typer.Option("ptb", "--calib", help="Calibration text: ptb, austen, finefoods-text or a UTF-8 "
                                                     "text file (its train split: all but the "
                                                     "last tenth of its lines)."),
    n: int = typer.Option(128, "--n", min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", min=2, help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing calibration windows."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Windows per block forward."),
    sequential: str = typer.Option("auto", "--sequential", help="layer: one forward per block, "
                                   "each layer calibrated on what the block's already compressed "
                                   "layers produce (faster); block: one forward per step plus "
                                   "one for the outputs, statistics on the block as it was (less "
                                   "memory); auto: block if a step asks for it (sparsegpt), "
                                   "else layer."),
    stats_precision: str = typer.Option("auto", "--stats-precision", help="The block order's "
                                        "statistics forwards: bfloat16 (on a bfloat16 copy of "
                                        "the block; outputs stay in the model's dtype), "
                                        "float32, or auto: bfloat16 for the steps that allow it "
                                        "(sparsegpt) where the hardware multiplies bfloat16 "
                                        "natively (AMX / AVX-512 BF16 CPUs, recent GPUs)."),
    merge: bool = typer.Option(False, "--merge", help="Write a plain dense HF model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only "
                                   "a directory slimtune wrote)."),
) -> None:
    """Validate recipe and arguments, load, calibrate, compress block by block, save."""
    from slimtune.compress import RecipeError, build_steps, check_targets, load_recipe

    check_model(model)
    if sequential not in ("auto", "layer", "block"):
        fail(f"--sequential must be 'auto', 'layer' or 'block', got {sequential!r}")
    if stats_precision not in ("auto", "float32", "bfloat16"):
        fail(f"--stats-precision must be 'auto', 'float32' or 'bfloat16', got {stats_precision!r}")
    if not recipe.is_file():
        fail(f"recipe {recipe} does not exist")
    try:
        configs = load_recipe(recipe)
    except RecipeError as err:
        fail(f"{recipe}: {err}")
    from slimtune.models import ModelNotFoundError, model_skeleton, weights_bytes

    check_output(out, weights_bytes(model), overwrite=overwrite)  # at most the model's size
    calib_file = check_data(calib, "train", "--calib")
    try:  # layer shapes (group sizes, N:M widths) before any weight is loaded
        skeleton = model_skeleton(model)
    except (ModelNotFoundError, ValueError):
        skeleton = None  # e.g. an adapter directory: checked once loaded
    if skeleton is not None:
        try:
            check_targets(skeleton, configs)
        except RecipeError as err:
            fail(f"{recipe}: {err}")
        del skeleton

    from slimtune.calib import calibration_windows, run_pipeline
    from slimtune.io.checkpoint import save_model

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
    report = run_pipeline(lm, windows, build_steps(configs), batch_size=batch_size,
                          sequential=None if sequential == "auto" else sequential,
                          stats_precision=stats_precision)
    seconds = time.perf_counter() - start
    from slimtune.layers import storage_report

    compressed = sorted({n for entry in report["steps"] for n in entry["layers"]})
    storage = storage_report(lm, compressed)
    metadata = {"source_model": model, "recipe": [c.model_dump() for c in configs],
                "calibration": {"data": str(calib_file or calib), "n": n, "seqlen": seqlen,
                                "seed": seed, "sequential": report["sequential"],
                                "stats_precision": [e["stats_precision"]
                                                    for e in report["steps"]]},
                "compress_seconds": seconds, "storage": storage}
    save_model(lm, tokenizer, out, metadata=metadata, merge=merge, overwrite=overwrite)
    from slimtune.evaluate import bytes_on_disk, parameter_count, peak_rss_mb

    stdout.print(f"compressed {model} with {recipe} in {seconds:.0f} s: "
                 f"{parameter_count(lm):,} parameters, {bytes_on_disk(out) / 1e6:.1f} MB on disk, "
                 f"peak RSS {peak_rss_mb():.0f} MB -> {out}")
    storage = storage_report(lm, compressed)  # as saved (dense again with --merge)
    stdout.print(f"{storage['layers']} compressed layers: {storage['bits_per_weight']:.3f} bits "
                 f"per weight (packed integers, scales, zeros, masks, sparse and low-rank parts "
                 f"included), {storage['megabytes']:.1f} MB of the model's "
                 f"{bytes_on_disk(out) / 1e6:.1f} MB on disk")
