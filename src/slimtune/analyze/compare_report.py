"""Files of ``slimtune compare``: ``compare.json``, ``layers.csv`` and three PNG plots.

Every file is written atomically (:func:`slimtune.io.atomic.atomic_file`), so an interrupted
run leaves each one either as it was or complete.

- ``compare.json``: settings, the definitions used, per model the summary, the evaluation
  (perplexity and Matrix Nuclear-Norm, and the base's) and every layer's row (without the
  singular values), and the alignment tables.
- ``layers.csv``: one line per model and layer (the rows, flat; ``best_match`` ``;``-joined).
- ``intruders.png`` (:func:`.intruders.plot_intruders`), ``delta_spectra.png``
  (:func:`.delta_spectra.plot_delta_spectra`), ``alignment.png``
  (:func:`.alignment.plot_alignment`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from slimtune.analyze.alignment import plot_alignment
from slimtune.analyze.delta_spectra import plot_delta_spectra
from slimtune.analyze.intruders import plot_intruders
from slimtune.io.atomic import atomic_file

FILES = ("compare.json", "layers.csv", "intruders.png", "delta_spectra.png", "alignment.png")
CSV_COLUMNS = ("model", "name", "type", "depth", "out", "in", "changed", "intruders",
               "delta_norm", "relative_change", "effective_rank", "stable_rank", "energy_r8",
               "energy_r32", "energy_r128", "align_base_left", "align_base_right", "best_match")


def definitions(settings: dict) -> dict:
    """One line per measure: what the numbers in the report are."""
    k, eps, ak = settings["k"], settings["epsilon"], settings["align_k"]
    return {
        "intruders": f"top-{k} left singular vectors y_j of W_t with max_i |cos(y_j, x_i)| < {eps} "
                     "over all left singular vectors x_i of W_0 (Shuttleworth et al. 2024)",
        "delta": "ΔW = W_t - W_0; effective_rank = exp(entropy of σ/Σσ) (Roy & Vetterli 2007), "
                 "stable_rank = ||ΔW||_F² / ||ΔW||_2², energy_rN = share of ||ΔW||_F² in the top N",
        "alignment": f"Σcos²θ_i / {ak} over the principal angles between top-{ak} singular "
                     "subspaces (left = output space U, right = input space V), mean over layers; "
                     f"chance ≈ {ak}/dimension; per layer also the angles θ_i in degrees "
                     "(align_base_angles)",
        "nuclear_norm": "Matrix Nuclear-Norm (Li et al. 2024): sum of the top-D column L2 norms of "
                        "the softmax probabilities [seqlen-1, vocab] of a window, D = min(rows, "
                        "vocab), divided by the rows; mean over the perplexity windows",
    }


def _clean(value):
    """JSON-safe: no tensors, no NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k != "singular_values"}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def report_json(result: dict, base: str, data: dict | None) -> dict:
    """The JSON document of a :func:`.compare.run_compare` result."""
    return _clean({"base": base, "data": data, "settings": result["settings"],
                   "definitions": definitions(result["settings"]), "models": result["models"],
                   "summary": result["summary"], "eval": result["eval"],
                   "alignment": result["alignment"], "layers": result["layers"]})


def layers_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for label, rows in result["layers"].items():
        for row in rows:
            line = {key: row.get(key) for key in CSV_COLUMNS if key in row}
            line.update(model=label, out=row["shape"][0], **{"in": row["shape"][1]})
            line["best_match"] = ";".join(f"{m:.4f}" for m in row["best_match"] or [])
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in line.items()})
    return buffer.getvalue()


def write_report(result: dict, out: str | os.PathLike, base: str,
                 data: dict | None = None) -> dict[str, Path]:
    """Write the files of the module docstring into ``out``; returns ``{file name: path}``."""
    out = Path(out)
    settings = result["settings"]
    paths = {}
    document = report_json(result, base, data)
    with atomic_file(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["compare.json"] = out / "compare.json"
    with atomic_file(out / "layers.csv") as tmp:
        tmp.write_text(layers_csv(result), encoding="utf-8")
    paths["layers.csv"] = out / "layers.csv"
    paths["intruders.png"] = plot_intruders(result["layers"], out / "intruders.png",
                                            settings["k"], settings["epsilon"])
    paths["delta_spectra.png"] = plot_delta_spectra(result["layers"], out / "delta_spectra.png")
    paths["alignment.png"] = plot_alignment(result["alignment"], out / "alignment.png",
                                            settings["align_k"])
    return paths
