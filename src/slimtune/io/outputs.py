"""Output paths checked before any work: a 5-minute job must not fail when it writes.

:func:`check_output` is what every command runs on its ``--out`` before loading a model: the path
is not an existing file or (unless resuming or overwriting) directory; with ``overwrite`` it is a
directory slimtune wrote (:func:`slimtune.io.atomic.check_replaceable`); the nearest existing
ancestor is a directory in which a file can really be created (a read-only or permission-denied
file system fails here, not after the work); and that file system has room for the expected
output (``needed_bytes`` plus a margin, as estimated by the command from the model's size).
What an interrupted earlier write to ``out`` left is cleaned up (and reported) first.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from slimtune.io.atomic import check_replaceable, recover_interrupted

MARGIN = 1.1  # free space needed: the estimate times this, plus SLACK_BYTES
SLACK_BYTES = 16 * 2 ** 20


class OutputError(ValueError):
    """An output path that cannot be written; the message says why and what to do."""


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(directory: Path) -> None:
    """Create and delete a file in ``directory``; :class:`OutputError` naming the reason if the
    file system refuses (read-only, permissions, no inodes left)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".slimtune-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise OutputError(f"cannot write in {directory}: {err.strerror or err}") from None


def check_output(out: str | os.PathLike, needed_bytes: int = 0, overwrite: bool = False,
                 resume: bool = False, flag: str = "--out") -> Path:
    """Check ``out`` as described in the module docstring; returns it as a ``Path``."""
    out = Path(out).expanduser()
    recover_interrupted(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a directory")
    if out.exists() and not resume:
        try:
            check_replaceable(out, overwrite)
        except FileExistsError as err:
            if overwrite:
                raise OutputError(f"{flag}: {err}") from None
            raise OutputError(f"{flag} {out} already exists (use --overwrite to replace it)") \
                from None
    base = nearest_existing(out)
    if not base.is_dir():
        raise OutputError(f"{flag} {out}: {base} is not a directory")
    probe_writable(base)
    need = int(needed_bytes * MARGIN) + SLACK_BYTES if needed_bytes else 0
    free = shutil.disk_usage(base).free
    if need and free < need:
        raise OutputError(f"{flag} {out}: the output needs about {need / 1e6:,.0f} MB, but "
                          f"only {free / 1e6:,.0f} MB are free on the file system of {base}")
    return out
