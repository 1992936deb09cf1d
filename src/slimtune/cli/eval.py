"""``slimtune eval``: perplexity of a causal LM on a text split, with speed and memory."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from slimtune.cli.app import (MODEL_HELP, adapter_dir, base_model_of, check_data, check_model,
                              command, fail, load_or_fail, stdout)


EVAL_HELP = (
    "Perplexity of a causal LM on a text split, with speed and memory.\n\n"
    "The split is tokenized once (no special tokens added) and its first --max-tokens tokens are cut "
    "into non-overlapping windows of --seqlen tokens (the incomplete tail is dropped). Every "
    "next-token prediction inside a window is scored (seqlen-1 per window); perplexity = "
    "exp(mean NLL). Example: slimtune eval --model smollm2-135m --data ptb --max-tokens 20480 "
    "--json\n\nWith --adapter DIR the saved adapter is evaluated on its recorded base model (or on "
    "--model); --adapter-rank b truncates it to its first b components in every layer (a DyLoRA "
    "adapter is trained for every b <= r).")

@command("eval", help=EVAL_HELP)
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help=MODEL_HELP + " Or a saved adapter directory. "
                                             "Default with --adapter: its base model."),
    data: str = typer.Option(..., "--data", "-d",
                             help="Registered text data set (ptb, austen, finefoods-text) or a path to a UTF-8 text "
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
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a",
                                           help="A saved slimtune adapter directory to evaluate "
                                                "(on --model, default: its base model)."),
    adapter_rank: Optional[int] = typer.Option(None, "--adapter-rank", min=1,
                                               help="Use only the first b components of every "
                                                    "adapted layer (DyLoRA: scale alpha/b)."),
) -> None:
    """Validate, load, score with :func:`slimtune.evaluate.perplexity`, print."""
    if model is None and adapter is None:
        fail("pass --model (a model or an adapter directory) or --adapter")
    if adapter is not None:
        from slimtune.adapt import read_manifest

        if model is not None and adapter_dir(model) is not None:
            fail(f"--model {model} is itself an adapter directory; pass a base model with "
                 "--adapter")
        try:
            manifest = read_manifest(adapter)
        except (FileNotFoundError, ValueError) as err:
            fail(f"--adapter: {err}")
        model = model or base_model_of(manifest, adapter)
    saved = adapter if adapter is not None else adapter_dir(model)
    if adapter_rank is not None:
        from slimtune.adapt import check_rank

        if saved is None:
            fail("--adapter-rank needs an adapter (--adapter DIR)")
        try:
            check_rank(saved, adapter_rank)
        except (FileNotFoundError, ValueError) as err:
            fail(f"--adapter-rank: {err}")
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
    from slimtune.models import is_causal_lm

    start = time.perf_counter()
    lm, tokenizer = load_or_fail(model)
    if adapter is not None or adapter_rank is not None:
        from slimtune.adapt import load, use_rank

        try:
            if adapter is not None:
                load(lm, adapter)
            if adapter_rank is not None:
                use_rank(lm, adapter_rank)
        except ValueError as err:
            fail(str(err))
    load_seconds = time.perf_counter() - start
    if not is_causal_lm(lm):
        fail(f"model {model!r} ({type(lm).__name__}) is not a causal language model: "
             "perplexity needs one (e.g. smollm2-135m)")
    ids = tokenize_text(tokenizer, text)
    try:
        result = perplexity(lm, ids, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size,
                            progress=True)
    except ValueError as err:
        fail(str(err))
    import torch

    report = {"model": model, "adapter": None if saved is None else str(saved),
              "adapter_rank": adapter_rank, "data": str(text_file) if text_file else data,
              "split": None if text_file else split, "parameters": parameter_count(lm),
              "max_tokens": max_tokens, "batch_size": batch_size, "split_tokens": ids.numel(),
              **result, "load_seconds": load_seconds, "torch_threads": torch.get_num_threads()}
    if as_json:
        print(json.dumps(report))
        return
    label = model if adapter is None else f"{adapter} on {model}"
    if adapter_rank is not None:
        label += f" at adapter rank {adapter_rank}"
    table = Table(title=f"{label} on {report['data']}"
                  + (f" ({split})" if split and not text_file else ""))
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
