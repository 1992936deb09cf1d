"""``slimtune export``: a compressed (or any) model as a checkpoint other tools load --
compressed-tensors for transformers / vLLM, GGUF for llama.cpp, or a plain dense Hugging Face
directory. Argument checking and printing only; the writers are in :mod:`slimtune.export`."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from slimtune.cli.app import (MODEL_HELP, check_model, check_output, check_output_file, command,
                              fail, load_or_fail, stdout)

FORMATS = ("compressed-tensors", "gguf", "hf")

EXPORT_HELP = (
    "Export a model (typically one `slimtune compress` wrote) for other tools.\n\n"
    "--format compressed-tensors: OUT is a directory in compressed-tensors' pack-quantized "
    "format; transformers loads it with AutoModelForCausalLM.from_pretrained(OUT) (asymmetric "
    "grids: pass quantization_config=CompressedTensorsConfig(dequantize=True)). Low-rank parts "
    "beside quantised weights (eora, lowrank_first) go to the PEFT adapter OUT/adapter; pruned "
    "weights are zeros inside the tensors; --embedding-type f16 halves the token embedding.\n\n"
    "--format gguf: OUT is the .gguf file (llama architecture). --gguf-type auto keeps every "
    "quantised layer's integers exactly (Q4_0 / Q4_1 / Q8_0, scales rounded to fp16: quantise with "
    "fp16_scales: true for a bit-exact file) and writes other layers in F16; q4_0 / q4_1 / q8_0 "
    "force one type (layers it cannot carry exactly are an error unless --requantize); f16 / f32 "
    "fold everything (low-rank and sparse parts included) into dense weights.\n\n"
    "--format hf: a dense Hugging Face directory with every part folded in.\n\n"
    "Everything is checked before any work; the output is written atomically.")


@command("export", help=EXPORT_HELP)
def export_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors, gguf or hf."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (compressed-tensors, hf) "
                                                      "or .gguf file (gguf); must not exist "
                                                      "unless --overwrite."),
    gguf_type: str = typer.Option("auto", "--gguf-type", help="auto, q4_0, q4_1, q8_0, f16 or "
                                                              "f32 (gguf only)."),
    embedding_type: str = typer.Option(None, "--embedding-type",
                                       help="Token embedding (and untied output head) type: "
                                            "f32, f16, q8_0 or q4_0 for gguf (default q8_0); f32 "
                                            "(default) or f16 for compressed-tensors."),
    requantize: bool = typer.Option(False, "--requantize", help="gguf: re-quantise by "
                                    "round-to-nearest the layers the type cannot carry exactly "
                                    "(folding their low-rank parts in) instead of failing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only one "
                                   "slimtune wrote)."),
) -> None:
    """Validate, load, write with the format's writer, print what was written."""
    from slimtune.export.compressed_tensors import EMBEDDING_DTYPES
    from slimtune.export.gguf import check_gguf_args, check_llama, estimate_bytes
    from slimtune.models import model_skeleton, weights_bytes

    if fmt not in FORMATS:
        fail(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "gguf" and (gguf_type != "auto" or requantize):
        fail("--gguf-type and --requantize apply to --format gguf only")
    if fmt == "hf" and embedding_type is not None:
        fail("--embedding-type applies to --format gguf and compressed-tensors only")
    if fmt == "compressed-tensors" and embedding_type not in (None, *EMBEDDING_DTYPES):
        fail(f"--embedding-type: compressed-tensors stores the embedding in "
             f"{' or '.join(EMBEDDING_DTYPES)}, got {embedding_type!r}")
    embedding_type = embedding_type or ("q8_0" if fmt == "gguf" else "f32")
    check_model(model)
    if fmt == "gguf":
        try:
            check_gguf_args(gguf_type, embedding_type)
        except ValueError as err:
            fail(f"--gguf-type/--embedding-type: {err}")
        if out.suffix != ".gguf":
            fail(f"--out: a GGUF export is one file named *.gguf, got {out}")
        skeleton = model_skeleton(model)
        try:
            check_llama(skeleton.config)
        except ValueError as err:
            fail(f"--format gguf: {err}")
        check_output_file(out, estimate_bytes(skeleton, gguf_type, embedding_type), overwrite,
                          magic=b"GGUF")
    elif fmt == "hf":  # every part folded into float32 weights
        dense = 4 * sum(p.numel() for p in model_skeleton(model).parameters())
        check_output(out, dense, overwrite=overwrite)
    else:  # the packed integers of the model's own files (and its float tensors as they are)
        check_output(out, weights_bytes(model), overwrite=overwrite)

    lm, tokenizer = load_or_fail(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _write(fmt, lm, tokenizer, model, out, gguf_type, embedding_type, requantize,
                        overwrite)
    for w in caught:
        stdout.print(f"warning: {w.message}", markup=False, highlight=False)
    stdout.print(f"exported {model} as {fmt} -> {out} ({result['bytes'] / 1e6:.1f} MB)",
                 markup=False, highlight=False)
    if result.get("q4_1_offset_error") is not None:
        stdout.print(f"Q4_1 stores scales and offsets in float16: they move a weight by at most "
                     f"{result['q4_1_offset_error']:.2e} of its layer's largest weight",
                     markup=False, highlight=False)
    print(json.dumps(result))  # one line a script can parse


def _write(fmt, lm, tokenizer, model, out, gguf_type, embedding_type, requantize, overwrite):
    try:
        if fmt == "compressed-tensors":
            from slimtune.export.compressed_tensors import write_compressed_tensors

            return write_compressed_tensors(lm, tokenizer, out, overwrite=overwrite,
                                            embedding_type=embedding_type)
        if fmt == "gguf":
            from slimtune.export.gguf import write_gguf

            return write_gguf(lm, tokenizer, out, gguf_type, embedding_type, requantize,
                              overwrite)
        from slimtune.io.checkpoint import save_model

        save_model(lm, tokenizer, out, merge=True, overwrite=overwrite)
        return {"path": str(out), "bytes": sum(f.stat().st_size for f in out.rglob("*")
                                               if f.is_file())}
    except (ValueError, FileExistsError) as err:
        fail(str(err))
