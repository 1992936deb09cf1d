"""`make demo`: the main job on the default model, printed as one table.

Loads SmolLM2-135M (converting its GGUF once), inspects the singular-value spectra of its 210
projection weights (writing ``out/demo/spectra.png``), measures perplexity and forward speed on the
PTB and Austen test splits (first 40 × 512 tokens of each), compresses it with
``recipes/demo.yaml`` (GPTQ 4-bit in symmetric groups of 32 with fp16 scales and act_order, then
EoRA rank 16, on 16 × 512 PTB-train calibration windows), saves it (``out/demo/compressed``: MB
on disk, bits per weight) and measures again; exports its GPTQ base to GGUF
(``out/demo/gptq-q4_0.gguf``: the integers and scales exactly, in Q4_0; EoRA's low-rank parts
are left out, as no quantised GGUF type has a place for them) and measures that file as
transformers' GGUF loader reads it; then fine-tunes a fresh copy with LoRA (r=16, alpha 32,
all projections) on Austen train for --adapt-steps steps of 4 × 128 tokens (lr 2e-4, the
library's training loop; adapter written to ``out/demo/lora-austen``) and measures again: Austen
perplexity falls (the tuned task), PTB shows what it costs elsewhere. Prints one table.

    python -m slimtune.demo [--max-tokens 20480] [--seqlen 512] [--adapt-steps 30] [--out out/demo]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimtune.adapt import make_config
from slimtune.analyze.spectra import layer_spectra, plot_spectra
from slimtune.calib import calibration_windows, run_pipeline
from slimtune.compress import build_steps, load_recipe
from slimtune.data import load_text
from slimtune.export.gguf import write_gguf
from slimtune.evaluate import (bytes_on_disk, parameter_count, peak_rss_mb, perplexity,
                               tokenize_text)
from slimtune.io.checkpoint import save_model
from slimtune.layers import FactoredLinear, storage_report
from slimtune.models import load_model, weights_bytes
from slimtune.train import build_task, make_train_config, train

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=40 * 512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--recipe", type=Path, default=RECIPE,
                    help="compression recipe for the compressed row (default: gptq 4-bit + eora 16)")
    ap.add_argument("--calib-n", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--adapt-steps", type=int, default=30,
                    help="LoRA steps on Austen train (0: skip the adaptation rows)")
    args = ap.parse_args(argv)
    if args.adapt_steps < 0:
        ap.error(f"--adapt-steps must be >= 0, got {args.adapt_steps}")
    adapt_config = make_train_config(data="austen", steps=max(args.adapt_steps, 1), batch=4,
                                     seqlen=128, lr=2e-4, eval_tokens=128, seed=0)
    console = Console(width=None if Console().is_terminal else 130)

    configs = load_recipe(args.recipe)  # validated before anything heavy
    start = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - start
    console.print(f"loaded {args.model}: {parameter_count(model):,} parameters in {load_s:.1f} s")

    rows = layer_spectra(model)
    png = plot_spectra(rows, args.out / "spectra.png", title=f"{args.model} singular values")

    table = Table(title=f"slimtune demo: {args.model} (perplexity: first {args.max_tokens} tokens, "
                        f"seqlen {args.seqlen}; spectra: median over layers, plot {png})")
    columns = ("what", "data / shape", "perplexity", "tokens/s", "MB on disk", "stable rank",
               "effective rank", "energy r=8/32/128")
    for col in columns:
        table.add_column(col, justify="left" if col in columns[:2] else "right")
    test_ids = {data: tokenize_text(tok, load_text(data, "test")) for data in ("ptb", "austen")}

    def add_perplexity_rows(label: str, megabytes: float | None = None, lm=None) -> None:
        for data, ids in test_ids.items():
            res = perplexity(model if lm is None else lm, ids, seqlen=args.seqlen, max_tokens=args.max_tokens)
            table.add_row(label, f"{data} test ({res['tokens']:,} scored)",
                          f"{res['perplexity']:.2f}", f"{res['tokens_per_s']:.0f}",
                          "-" if megabytes is None else f"{megabytes:.0f}", "-", "-", "-")

    add_perplexity_rows(f"dense ({parameter_count(model) / 1e6:.1f}M)",
                        weights_bytes(args.model) / 1e6)
    windows = calibration_windows(tok, "ptb", "train", n=args.calib_n, seqlen=512, seed=0)
    t = time.perf_counter()
    report = run_pipeline(model, windows, build_steps(configs))
    seconds = time.perf_counter() - t
    saved = save_model(model, tok, args.out / "compressed", overwrite=True,
                       metadata={"recipe": [c.model_dump() for c in configs]})
    storage = storage_report(model, sorted({n for e in report["steps"] for n in e["layers"]}))
    console.print(f"compressed with {args.recipe} on {args.calib_n}×512 PTB-train windows in "
                  f"{seconds:.0f} s: {storage['layers']} layers at "
                  f"{storage['bits_per_weight']:.2f} bits per weight (scales, zeros and low-rank "
                  f"parts included); saved to {saved}")
    methods = " + ".join(c.method for c in configs)
    add_perplexity_rows(f"{methods} ({storage['bits_per_weight']:.2f} bits/weight)",
                        bytes_on_disk(saved) / 1e6)
    gguf = export_gguf_base(model, tok, args.out / "gptq-q4_0.gguf", console)
    types = ", ".join(sorted(k.replace("exact:", "") for k in gguf["layers"]))
    add_perplexity_rows(f"gptq base as GGUF {types} (transformers)", gguf["bytes"] / 1e6,
                        lm=gguf["model"])
    del gguf
    if args.adapt_steps:
        del model
        model, tok = load_model(args.model)
        out = args.out / "lora-austen"
        if out.exists():  # the demo's own output of an earlier run
            shutil.rmtree(out)
        t = time.perf_counter()
        model, history = train(model, build_task(adapt_config, tok), adapt_config, out,
                               adapter=make_config("lora", r=16, alpha=32.0))
        console.print(f"LoRA r=16 on Austen train: {args.adapt_steps} steps of 4×128 tokens in "
                      f"{time.perf_counter() - t:.0f} s ({history['seconds_per_step']:.2f} s/step),"
                      f" loss {history['steps'][0]['loss']:.3f} → {history['steps'][-1]['loss']:.3f};"
                      f" adapter in {out}")
        add_perplexity_rows(f"lora r=16, {args.adapt_steps} Austen steps "
                            f"({history['trainable_parameters'] / 1e6:.1f}M trained)")
    table.add_section()
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    for layer_type, group in by_type.items():
        med = {k: statistics.median(r[k] for r in group)
               for k in ("stable_rank", "effective_rank", "energy_r8", "energy_r32", "energy_r128")}
        table.add_row(f"{layer_type.rsplit('.', 1)[-1]} ×{len(group)}",
                      "×".join(map(str, group[0]["shape"])), "-", "-", "-",
                      f"{med['stable_rank']:.1f}", f"{med['effective_rank']:.0f}",
                      f"{med['energy_r8']:.2f} / {med['energy_r32']:.2f} / {med['energy_r128']:.2f}")
    console.print(table)
    console.print(f"total {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB")


def export_gguf_base(model, tok, out: Path, console: Console) -> dict:
    """Write ``model``'s quantised bases (its low-rank parts left out) to the GGUF file ``out``
    and load it back with transformers' own GGUF loader (``gguf_file=``, dequantised to float32).
    ``model`` is unchanged. Returns the writer's report with the loaded ``model``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    parts = {n: m.lowrank for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    try:
        for name in parts:
            model.get_submodule(name).lowrank = None
        t = time.perf_counter()
        report = write_gguf(model, tok, out, overwrite=True)
    finally:
        for name, part in parts.items():
            model.get_submodule(name).lowrank = part
    console.print(f"exported the GPTQ base (EoRA parts left out) to {out} in "
                  f"{time.perf_counter() - t:.0f} s: {report['bytes'] / 1e6:.1f} MB, layers "
                  f"{report['layers']}, embedding {report['embedding_type']}")
    t = time.perf_counter()
    hf_logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()) as err:  # the GGUF loader's own tqdm bar
        report["model"] = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                               dtype="float32").eval()
    for line in err.getvalue().replace("\r", "\n").splitlines():
        if line.strip() and "de-quantizing GGUF tensors" not in line:
            print(line, file=sys.stderr)
    console.print(f"transformers loaded {out.name} in {time.perf_counter() - t:.1f} s")
    return report


if __name__ == "__main__":
    main()
