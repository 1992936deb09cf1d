"""Output paths checked before any work: a 5-minute job must not fail when it writes.

:func:`check_output` is what every command runs on its ``--out`` before loading a model: the path
is not an existing file or (unless resuming or overwriting) directory; with ``overwrite`` it is a
directory slimtune wrote (:func:`slimtune.io.atomic.check_replaceable`); the nearest existing
ancestor is a directory in which a file can really be created (a read-only or permission-denied
file system fails here, not after the work); and that file system has room for the expected
output (``needed_bytes`` plus a margin, as estimated by the command from the model's size).
What an interrupted earlier write to ``out`` left is cleaned up (and reported) first.
:func:`check_output_file` does the same for an output that is a single file (a GGUF export).
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
    check_room(out, needed_bytes, flag)
    return out


def check_output_file(out: str | os.PathLike, needed_bytes: int = 0, overwrite: bool = False,
                      flag: str = "--out", magic: bytes | None = None) -> Path:
    """:func:`check_output` for an output that is one file (written by
    :func:`slimtune.io.atomic.atomic_file`): not a directory; an existing file only with
    ``overwrite`` and, given ``magic``, only if it starts with those bytes (so that a file of
    another kind is never replaced); then the same writability and free-space checks."""
    out = Path(out).expanduser()
    recover_interrupted(out)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a directory; give the file to write")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"{flag} {out} already exists (use --overwrite to replace it)")
        if out.is_symlink() or not out.is_file():
            raise OutputError(f"{flag}: refusing to replace {out}: it is not a regular file")
        if magic is not None:
            with open(out, "rb") as f:
                if f.read(len(magic)) != magic:
                    raise OutputError(f"{flag}: refusing to replace {out}: it does not start "
                                      f"with {magic!r}, so slimtune did not write it")
    check_room(out, needed_bytes, flag, nearest_existing(out.parent))
    return out


def check_room(out: Path, needed_bytes: int, flag: str = "--out", base: Path | None = None) -> None:
    """``base`` (default: the nearest existing ancestor of ``out``) is a directory a file can be
    created in, on a file system with ``needed_bytes`` (times :data:`MARGIN`, plus
    :data:`SLACK_BYTES`) free."""
    base = nearest_existing(out) if base is None else base
    if not base.is_dir():
        raise OutputError(f"{flag} {out}: {base} is not a directory")
    probe_writable(base)
    need = int(needed_bytes * MARGIN) + SLACK_BYTES if needed_bytes else 0
    free = shutil.disk_usage(base).free
    if need and free < need:
        raise OutputError(f"{flag} {out}: the output needs about {need / 1e6:,.0f} MB, but "
                          f"only {free / 1e6:,.0f} MB are free on the file system of {base}")
