"""``slimtune export-peft``: turn a saved slimtune adapter into a Hugging Face PEFT LoRA adapter.

Argument checking and printing only; the conversion is :func:`slimtune.adapt.to_peft`. Registered
on the typer app when :mod:`slimtune.cli` imports this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimtune.cli.app import (MODEL_HELP, base_model_of, check_output, command, fail, load_or_fail,
                              stdout)

EXPORT_PEFT_HELP = (
    "Export a slimtune adapter (a directory written by slimtune.adapt.save) as a PEFT LoRA adapter "
    "(adapter_config.json + adapter_model.safetensors).\n\n"
    "The base model is the one recorded in the adapter's adapter.json (override with --model). "
    "`peft.PeftModel.from_pretrained(<that base model>, OUT)` then gives the adapted model's "
    "outputs. Base-changing inits (PiSSA, OLoRA, CorDA, ...) become a LoRA of rank r + r0 on the "
    "original weights; DoRA exports with use_dora. Adapters with sparse parts, masks or generated "
    "factors cannot be expressed in PEFT's format and exit with an error naming the layer. OUT is "
    "written atomically.")


@command("export-peft", help=EXPORT_PEFT_HELP)
def export_peft_command(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="Directory of a saved slimtune "
                                                              "adapter (adapter.json + "
                                                              "adapter.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output PEFT adapter directory (must not "
                                                      "exist unless --overwrite)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help=MODEL_HELP + " Default: the adapter's base model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only "
                                   "a directory slimtune wrote)."),
) -> None:
    """Validate, load the base, put the adapter on it, export with ``to_peft``."""
    from slimtune.adapt import load, read_manifest, to_peft
    from slimtune.models import ModelNotFoundError, check_model_name

    try:
        manifest = read_manifest(adapter)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    weights = Path(adapter) / "adapter.safetensors"
    # base-changing inits export rank r + r0: at most about twice the adapter
    check_output(out, 2 * weights.stat().st_size, overwrite=overwrite)
    base = model or base_model_of(manifest, adapter)
    try:
        check_model_name(base)
    except ModelNotFoundError as err:
        fail(f"base model of {adapter}: {err} (pass --model)")

    lm, _ = load_or_fail(base)
    try:
        load(lm, adapter)
        path = to_peft(lm, out, overwrite=overwrite)
    except ValueError as err:
        fail(str(err))
    layers = manifest["layers"]
    stdout.print(f"exported {manifest['config']['method']} adapter ({len(layers)} layers) on "
                 f"{base} -> {path}", markup=False, highlight=False)
