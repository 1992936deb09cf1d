"""``slimtune inspect``: singular-value spectra of every linear weight of a model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimtune.cli.app import (MODEL_HELP, check_model, check_output, command, load_or_fail,
                              model_label, stdout)


INSPECT_HELP = (
    "Singular-value spectra of every linear weight (embeddings and LM head excluded).\n\n"
    "Prints per layer: shape, stable rank, effective rank (spectral entropy) and the fraction of "
    "squared Frobenius norm kept at rank 8/32/128. Writes OUT/spectra.png (normalised spectra "
    "sigma_i/sigma_1 per layer type, coloured by depth) and OUT/layers.json.")


@command("inspect", help=INSPECT_HELP)
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
    check_output(out, 8 * 2 ** 20, resume=True)  # writes two files into OUT

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
