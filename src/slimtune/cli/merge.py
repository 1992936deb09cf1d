"""``slimtune merge``: merge fine-tuned models or adapters into one Hugging Face directory (or
one adapter directory).

Argument checking and printing only; the merge is :func:`slimtune.merge.models.merge_models`.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from slimtune.cli.app import check_output, command, fail, stdout

MERGE_HELP = (
    "Merge fine-tuned models or LoRA adapters of one base.\n\n"
    "The YAML config names `method` (linear, task_arithmetic, ties, dare, breadcrumbs, slerp, "
    "compeft, pcb, tall_masks, tsv, knots, flora, lora_lego), `base` (a registered model or a "
    "directory), `models` (a list of `path`: a Hugging Face model directory, a slimtune adapter "
    "or a PEFT LoRA adapter; and `weight`), optionally `output` (auto, model or adapter) and the "
    "method's own keys at the top level (e.g. `density: 0.5`). Everything is checked before a "
    "tensor is read; tensors are then merged one at a time and streamed into OUT atomically: a "
    "Hugging Face model directory, or an adapter directory (slimtune and PEFT formats) when every "
    "input is an adapter and the method merges factors (linear, task_arithmetic, flora, knots, "
    "lora_lego).")


@command("merge", help=MERGE_HELP)
def merge_command(
    config: Path = typer.Option(..., "--config", "-c", help="YAML merge config."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (must not exist "
                                                      "unless --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only "
                                   "a directory slimtune wrote)."),
) -> None:
    """Validate the config and inputs, check OUT, merge, report."""
    from slimtune.evaluate import peak_rss_mb
    from slimtune.merge.models import check_inputs, load_config, merge_models
    from slimtune.merge.sources import tensor_files

    try:
        spec, _ = load_config(config)
        base, _, _ = check_inputs(spec)
    except ValueError as err:
        fail(str(err))
    size = sum(f.stat().st_size for f in set(tensor_files(base).values()))
    check_output(out, size, overwrite=overwrite)
    start = time.perf_counter()
    path = merge_models(config, out, overwrite=overwrite)
    kind = "an adapter" if (path / "adapter.json").is_file() else "a model"
    stdout.print(f"merged {len(spec.models)} inputs with {spec.method} into {kind} at {path} in "
                 f"{time.perf_counter() - start:.1f} s (peak RSS {peak_rss_mb():.0f} MB)")
