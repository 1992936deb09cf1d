"""The Typer app of the ``slimtune`` command line and the helpers every command shares.

Commands (one module each in this package, registered with :func:`command`) only parse, validate
and print; the work lives in the library. Bad input (unknown model, data set, split, missing
file, an output that cannot be written) prints one ``error: ...`` line on stderr and exits with
code 2, before anything heavy is loaded; so does any user error raised later (a ``ValueError``,
an ``OSError`` such as a full disk, a diverged run). Ctrl-C exits 130 with ``error:
interrupted``. Anything else is a bug: ``error: internal error ...``, exit 1. Tracebacks only
with ``--debug`` (or ``SLIMTUNE_DEBUG=1``). Progress goes to stderr, so ``--json`` output on
stdout stays parseable.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional

import click
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
DEBUG_ENV = "SLIMTUNE_DEBUG"
# errors that are the user's to fix: bad values, unreadable or unwritable files, a diverged run
USER_ERRORS = (ValueError, OSError, FloatingPointError)


@app.callback()
def options(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks instead of one "
                               "error line (also: SLIMTUNE_DEBUG=1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output and no notes "
                               "on stderr (errors and warnings still print)."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also append every "
                                            "progress line, note, warning and error to this "
                                            "file, timestamped."),
) -> None:
    """Options before the command name apply to every command."""
    from slimtune.progress import configure

    if debug:
        os.environ[DEBUG_ENV] = "1"
    configure(quiet=quiet, log_file=log_file)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _error_line(text: str) -> None:
    from slimtune.progress import log

    stderr.print(f"error: {text}", markup=False, highlight=False, soft_wrap=True)
    log(f"error: {text}")


def fail(message: str) -> None:
    """Print one error line on stderr and exit with code 2 (bad input)."""
    _error_line(message)
    raise typer.Exit(code=2)


def describe_error(err: BaseException) -> str:
    """A user error as one message (an OSError with its reason and file)."""
    if isinstance(err, OSError) and err.strerror and not str(err).startswith(err.strerror):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return str(err) or type(err).__name__


def command(name: str, help: str) -> Callable:
    """``@app.command(name, help=help)`` with the error handling of the module docstring."""
    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def run(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                    click.ClickException):
                raise
            except KeyboardInterrupt:
                if debugging():
                    raise
                _error_line("interrupted (unfinished outputs were not written)")
                raise typer.Exit(code=130)
            except USER_ERRORS as err:
                if debugging():
                    raise
                fail(describe_error(err))
            except Exception as err:
                if debugging():
                    raise
                _error_line(f"internal error ({type(err).__name__}: {err}); rerun with --debug "
                            "for the traceback and report it")
                raise typer.Exit(code=1)
        return app.command(name, help=help)(run)
    return decorate


def check_output(out: Path, needed_bytes: int = 0, overwrite: bool = False,
                 resume: bool = False) -> None:
    """:func:`slimtune.io.outputs.check_output`, failing with its message."""
    from slimtune.io.outputs import OutputError, check_output as check

    try:
        check(out, needed_bytes, overwrite=overwrite, resume=resume)
    except OutputError as err:
        fail(str(err))


def check_output_file(out: Path, needed_bytes: int = 0, overwrite: bool = False,
                      magic: bytes | None = None) -> None:
    """:func:`slimtune.io.outputs.check_output_file`, failing with its message."""
    from slimtune.io.outputs import OutputError, check_output_file as check

    try:
        check(out, needed_bytes, overwrite=overwrite, magic=magic)
    except OutputError as err:
        fail(str(err))


def base_model_of(manifest: dict, adapter: Path) -> str:
    """The base model recorded in ``adapter.json``, as a name ``load_model`` accepts.

    Adapters saved from a registered model record its converted cache directory; when that
    directory is gone (another machine, another cache) the registered name it came from is used.
    """
    from slimtune.models import MODEL_NAMES

    base = manifest.get("base_model")
    if not base:
        fail(f"{adapter}/adapter.json records no base model: pass --model")
    path = Path(base).expanduser()
    if base in MODEL_NAMES or (path / "config.json").is_file():
        return base
    if path.name in MODEL_NAMES:
        return path.name
    return base


def adapter_dir(name: str) -> Path | None:
    """``name`` as a saved slimtune adapter directory (it holds ``adapter.json``), else None."""
    path = Path(name).expanduser()
    return path if (path / "adapter.json").is_file() else None


def check_model(name: str) -> None:
    """A registered model, a model directory, or an adapter directory whose base model is one."""
    from slimtune.models import ModelNotFoundError, check_model_name

    adapter = adapter_dir(name)
    if adapter is not None:
        from slimtune.adapt import read_manifest

        try:
            name = base_model_of(read_manifest(adapter), adapter)
        except (OSError, ValueError) as err:
            fail(str(err))
    try:
        check_model_name(name)
    except ModelNotFoundError as err:
        fail(f"base model of {adapter}: {err}" if adapter is not None else str(err))


def check_data(data: str, split: str, flag: str = "--data") -> Optional[Path]:
    """Validate a text source (a registered data set and its split, or a UTF-8 text file: read,
    not tokenized); return the file's path, or None for a registered name."""
    from slimtune.data import TEXT_DATASETS, check_text_source, is_text_file

    try:
        check_text_source(data, split if data in TEXT_DATASETS else "train")
    except (ValueError, FileNotFoundError) as err:
        fail(f"{flag}: {err}")
    return Path(data).expanduser() if is_text_file(data) else None


def model_label(name: str) -> str:
    """A short name for output paths: the registered name, or the directory's name."""
    return Path(name.rstrip("/\\")).name or "model"


def load_or_fail(name: str):
    """``(model, tokenizer)``; an adapter directory loads its base model with the adapter on it."""
    from slimtune.models import ModelNotFoundError, load_model

    adapter = adapter_dir(name)
    try:
        if adapter is None:
            return load_model(name)
        from slimtune.adapt import load, read_manifest

        model, tokenizer = load_model(base_model_of(read_manifest(adapter), adapter))
        return load(model, adapter), tokenizer
    except ModelNotFoundError as err:
        fail(str(err))
