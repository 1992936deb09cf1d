"""Write a safetensors file one tensor at a time, holding only the tensor being written; read
one tensor (or a range of its rows) without memory-mapping the file.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. When all names,
dtypes and shapes are known in advance (a merge writes the base's tensors), the header can be
written first and each tensor's bytes appended as it is computed::

    with SafetensorsStream(path, {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}) as out:
        out.write("a", a)
        out.write("b", b)

The layout is the format's: an 8-byte little-endian header length, the JSON header (tensors in
the given order, ``data_offsets`` relative to the data; padded with spaces to 8 bytes, as the
reference writer does), then the data. A tensor out of order, of another dtype or shape, or a
file closed before every tensor was written is an error (the caller writes inside an atomic
directory, so nothing half-written is ever published).

:class:`SafetensorsReader` reads with ``pread`` into a fresh tensor instead of ``mmap``: pages of
a memory-mapped file that were read stay resident in the process (``safe_open`` maps the whole
file), so a merge reading four models through mappings grows to their total size; read this way
the process holds only the tensors it is working on.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPES[dtype].itemsize * math.prod(shape)


class SafetensorsStream:
    """See the module docstring. ``specs``: ``{name: (safetensors dtype, shape)}`` in order."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        unknown = {n: d for n, (d, _) in specs.items() if d not in DTYPES}
        if unknown:
            raise ValueError(f"unknown safetensors dtypes {unknown}")
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            size = nbytes(dtype, tuple(shape))
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order, self.specs, self.next, self.rows_done = list(specs), specs, 0, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise ValueError(f"safetensors stream: got {name}, expected {expected}")
        dtype, shape = self.specs[name]
        if tensor.dtype != DTYPES[dtype] or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"safetensors stream: {name} is {tensor.dtype} {list(tensor.shape)}, "
                             f"declared {dtype} {list(shape)}")
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)
        self.next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """The next rows (along dim 0) of tensor ``name``; it is complete once all are written."""
        if self.next >= len(self.order) or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise ValueError(f"safetensors stream: got {name}, expected {expected}")
        dtype, shape = self.specs[name]
        shape = tuple(shape)
        if rows.dtype != DTYPES[dtype] or not shape or tuple(rows.shape[1:]) != shape[1:] or \
                self.rows_done + rows.shape[0] > shape[0]:
            raise ValueError(f"safetensors stream: rows {list(rows.shape)} ({rows.dtype}) do not "
                             f"fit {name}, declared {dtype} {list(shape)}")
        data = rows.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)
        self.rows_done += rows.shape[0]
        if self.rows_done == shape[0]:
            self.next, self.rows_done = self.next + 1, 0

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.order):
            raise ValueError(f"safetensors stream closed after {self.next} of "
                             f"{len(self.order)} tensors")

    def __enter__(self) -> "SafetensorsStream":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()


class SafetensorsReader:
    """Tensors of one safetensors file by name, read on demand (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, size, 8))
        except (struct.error, ValueError) as err:
            os.close(self.fd)
            raise ValueError(f"{self.path} is not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.start, self.header = 8 + size, header

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its ``rows``, a step-1 slice along dim 0) as a new tensor."""
        entry = self.header[name]
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None:
            first, last, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("rows must be a contiguous slice")
            row = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + first * row, begin + max(last, first) * row
            shape[0] = max(last - first, 0)
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else None
        done = 0
        while done < end - begin:
            got = os.preadv(self.fd, [view[done:]], self.start + begin + done)
            if got <= 0:
                raise ValueError(f"{self.path}: {name} is truncated")
            done += got
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
