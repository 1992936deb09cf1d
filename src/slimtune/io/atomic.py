"""Atomic writes: build a directory (or file) beside its destination, then rename it into place.

This is the only atomic writer: every directory the library produces (models, adapters, PEFT
exports, training checkpoints, the converted model cache) goes through :func:`atomic_dir`, every
single file (plots, tables) through :func:`atomic_file`, so an interrupted or failed write never
leaves a half-written destination and never loses what was there before.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_writable(out: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` if ``out`` exists and ``overwrite`` is false."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    The old ``out`` (allowed only with ``overwrite``) is set aside until the new one is in place,
    put back if the final rename fails, and deleted afterwards. If the body raises, the temporary
    directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        check_writable(out, overwrite)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``.

    If the body raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
