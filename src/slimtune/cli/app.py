"""The Typer app of the ``slimtune`` command line and the helpers every command shares.

Commands (one module each in this package) only parse, validate and print; the work lives in the
library. Bad input (unknown model, data set, split, missing file) prints one ``error: ...`` line
on stderr and exits with code 2, before anything heavy is loaded. Progress bars go to stderr, so
``--json`` output on stdout stays parseable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

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
