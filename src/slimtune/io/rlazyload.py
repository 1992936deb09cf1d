"""Read objects from an R lazy-load database (``.rdx`` index + ``.rdb`` chunks) without R.

R packages store their data sets (``<pkg>/data/Rdata.rdx|.rdb``) and code this way. The format:

* ``X.rdx`` is one serialized R object, usually gzip-compressed (``saveRDS`` style; zlib-framed,
  bzip2, xz or uncompressed files are accepted too). It is a named list with
  ``variables`` (object name -> integer ``c(offset, length)`` into the ``.rdb``), ``references``
  (environments shared between objects; not resolved here, data sets do not use them) and
  ``compressed`` (``TRUE``/1 = zlib, 2 = bzip2, 3 = xz).
* ``X.rdb`` is the concatenation of the chunks. A chunk is a 4-byte big-endian length of the
  uncompressed payload, then either a zlib stream (its first byte is ``x``), or a type byte and the
  payload: ``Z`` raw LZMA2 (no xz container: ``lzma`` FORMAT_RAW, one LZMA2 filter at preset
  ``9 | PRESET_EXTREME``), ``2`` bzip2, ``1`` zlib, ``0`` stored.
* The decompressed payload is an R serialization stream (``X\\n`` XDR), parsed with the ``rdata``
  package (:func:`rdata.parser.parse_data`) and converted with :func:`rdata.conversion.convert`.

Conversion (:func:`read_lazyload`) returns plain Python/numpy values, no pandas: a character vector
is a numpy array of ``str`` (``None`` for ``NA``), a numeric vector a numpy array, a factor a
``list`` of level strings (``None`` for ``NA``), a data.frame (or tibble) a ``dict`` of column name
-> column, a named list a ``dict``.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping

_LZMA2_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def decompress_chunk(chunk: bytes) -> bytes:
    """Decompress one ``.rdb`` chunk (4-byte big-endian length, then type byte or zlib stream)."""
    if len(chunk) < 5:
        raise ValueError(f"R lazy-load chunk too short ({len(chunk)} bytes)")
    (expected,) = struct.unpack(">I", chunk[:4])
    kind, payload = chunk[4:5], chunk[5:]
    if kind == b"Z":
        data = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA2_FILTERS).decompress(payload)
    elif kind == b"2":
        data = bz2.decompress(payload)
    elif kind == b"1":
        data = zlib.decompress(payload)
    elif kind == b"0":
        data = payload
    else:  # R's original framing: the zlib stream starts right after the length ('x' = 0x78)
        data = zlib.decompress(chunk[4:])
    if len(data) != expected:
        raise ValueError(f"R lazy-load chunk decompressed to {len(data)} bytes, header says {expected}")
    return data


def decompress_serialized_file(raw: bytes) -> bytes:
    """Bytes of a serialized R file (``.rds``/``.rdx``) with any compression removed."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:2] in (b"X\n", b"A\n", b"B\n"):
        return raw
    return decompress_chunk(raw)


def _dataframe_to_dict(obj: Any, attrs: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return {str(name): column for name, column in obj.items()}
    names = attrs.get("names")
    if names is None:
        return {str(i): column for i, column in enumerate(obj)}
    return {str(name): column for name, column in zip(names, obj)}


def _factor_to_list(obj: Any, attrs: Mapping[str, Any]) -> list[str | None]:
    levels = [str(level) for level in attrs["levels"]]
    codes = obj.filled(-1) if hasattr(obj, "filled") else obj
    return [levels[code - 1] if code >= 1 else None for code in codes.tolist()]


# rdata's own constructors (used for every other R class) build pandas objects.
PLAIN_CONSTRUCTORS: dict[str, Any] = {
    "data.frame": _dataframe_to_dict,
    "tbl_df": _dataframe_to_dict,
    "tbl": _dataframe_to_dict,
    "factor": _factor_to_list,
    "ordered": _factor_to_list,
}


def parse_serialized(data: bytes) -> Any:
    """Convert an uncompressed R serialization stream to plain Python values (see module doc)."""
    import rdata  # imported here: it pulls in pandas and xarray (~0.7 s)

    parsed = rdata.parser.parse_data(data, extension=".rds")
    constructors = {**rdata.conversion.DEFAULT_CLASS_MAP, **PLAIN_CONSTRUCTORS}
    return rdata.conversion.convert(parsed, constructors)


def read_index(rdx_path: str | Path) -> dict[str, tuple[int, int]]:
    """The ``.rdx`` ``variables`` table: object name -> (offset, length) in the ``.rdb``."""
    index = parse_serialized(decompress_serialized_file(Path(rdx_path).read_bytes()))
    return {str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()}


def read_lazyload(rdx_path: str | Path, name: str) -> Any:
    """Object ``name`` from the lazy-load database ``rdx_path`` (its ``.rdb`` sits beside it)."""
    rdx_path = Path(rdx_path)
    variables = read_index(rdx_path)
    if name not in variables:
        raise KeyError(f"{name!r} is not in {rdx_path}; it holds: {', '.join(sorted(variables))}")
    offset, length = variables[name]
    with open(rdx_path.with_suffix(".rdb"), "rb") as rdb:
        rdb.seek(offset)
        chunk = rdb.read(length)
    if len(chunk) != length:
        raise ValueError(f"{rdx_path.with_suffix('.rdb')} is truncated at object {name!r}")
    return parse_serialized(decompress_chunk(chunk))
