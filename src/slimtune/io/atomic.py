"""Atomic writes: build a directory (or file) beside its destination, then rename it into place.

This is the only atomic writer: every directory the library produces (models, adapters, PEFT
exports, training checkpoints, the converted model cache) goes through :func:`atomic_dir`, every
single file (plots, tables) through :func:`atomic_file`, so an interrupted or failed write never
leaves a half-written destination and never loses what was there before. Every directory it
writes holds a marker file (:data:`MARKER`); only such directories (or empty ones) are ever
replaced, so no command deletes what the user put there. What a killed write leaves beside its
destination is cleaned up, and reported, by the next write to the same destination.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


MARKER = ".slimtune-output"  # in every directory slimtune writes: only these may be replaced
PAUSE_ENV, PAUSE_FILE_ENV = "SLIMTUNE_TEST_PAUSE_AT", "SLIMTUNE_TEST_PAUSE_FILE"


class NotOurDirectoryError(FileExistsError):
    """An existing path that slimtune did not write: never replaced or deleted."""


def is_ours(path: Path) -> bool:
    """``path`` is a directory slimtune wrote (it holds the marker file)."""
    return (path / MARKER).is_file()


def mark(directory: Path) -> None:
    """Claim ``directory`` as slimtune's output (write the marker file)."""
    (directory / MARKER).write_text(json.dumps({"written_by": "slimtune"}) + "\n")


def check_replaceable(out: Path, overwrite: bool) -> None:
    """``FileExistsError`` if ``out`` exists and ``overwrite`` is false; with ``overwrite``,
    :class:`NotOurDirectoryError` unless it is a directory slimtune wrote or an empty one."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    if not out.is_dir() or out.is_symlink():
        raise NotOurDirectoryError(f"refusing to replace {out}: it is not a directory")
    if not is_ours(out) and any(out.iterdir()):
        raise NotOurDirectoryError(
            f"refusing to replace {out}: slimtune did not write it (no {MARKER} file); "
            "move it away or choose another output")


def leftovers(out: Path) -> list[Path]:
    """Temporary paths an interrupted write to ``out`` left beside it."""
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefixes))


def recover_interrupted(out: Path) -> None:
    """Finish what an interrupted write to ``out`` left: an old ``out`` set aside before the
    final rename is put back if ``out`` is missing; temporary copies are removed. Each action
    is reported (:func:`slimtune.progress.note`)."""
    from slimtune.progress import note

    for path in leftovers(Path(out)):
        kept = path / out.name
        if path.name.startswith(f".{out.name}.old-") and kept.is_dir() and not out.exists():
            os.replace(kept, out)
            note(f"restored {out} from {path} (a write to it was interrupted before it finished)")
        else:
            note(f"removed {path}, left by an interrupted write to {out}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the kernel, C library or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def fault_point(name: str) -> None:
    """A place where the fault-injection tests can stop the process: when the environment names
    this point (``SLIMTUNE_TEST_PAUSE_AT``), create ``SLIMTUNE_TEST_PAUSE_FILE`` and wait there
    (up to 120 s) to be killed. A no-op otherwise."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    Path(os.environ[PAUSE_FILE_ENV]).write_text(str(os.getpid()))
    time.sleep(120)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    Leftovers of an interrupted earlier write to ``out`` are cleaned up first
    (:func:`recover_interrupted`). An existing ``out`` may be replaced only with ``overwrite``
    and only if slimtune wrote it (:func:`check_replaceable`): the two are swapped in one atomic
    step (:func:`exchange`) where the system allows, else the old one is set aside until the new
    one is in place, put back if the final rename fails, and deleted afterwards. The new directory
    carries the marker file. If the body raises, the temporary directory is removed and ``out``
    is untouched.
    """
    out = Path(out)
    recover_interrupted(out)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        mark(tmp)
        check_replaceable(out, overwrite)
        fault_point(f"final-rename:{out.name}")
        if out.exists() and exchange(tmp, out):  # one atomic swap: out is never missing
            shutil.rmtree(tmp, ignore_errors=True)  # now the old contents
            return
        old = None
        if out.exists():  # no atomic exchange here: set the old one aside for the rename
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
    recover_interrupted(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        fault_point(f"final-rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
