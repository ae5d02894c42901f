"""Read a rank's rows of safetensors tensors with plain file reads (no memory map).

safetensors' own reader memory-maps the file; every page a rank touches then
counts in its resident memory for as long as the file is open, so loading a
sharded model showed each rank at about the full state dict size. FSDP2 shards
along dim 0, so a rank's part of a tensor is one contiguous byte range: we
read it straight into the local shard (or into a small staging buffer when
the dtype differs). Slices that are not contiguous fall back to safetensors'
`get_slice`. The format is an 8-byte little-endian header length, a JSON
header (dtype, shape, data_offsets per tensor) and the raw data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.files import FileError, reading

WHAT = "safetensors weights"
DAMAGED = "the file is damaged or truncated: download or save it again"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """One open .safetensors file: its header, and reads of row ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fallback = None
        with reading(self.path, WHAT, DAMAGED):  # missing, a folder, unreadable: one line naming the file
            self.fh = open(self.path, "rb")
        try:
            self.header, self.data_start = self._read_header()
        except BaseException:
            self.fh.close()
            raise

    def _damaged(self, detail: str) -> FileError:
        return FileError(f"{self.path}: not a valid safetensors file ({detail}); {DAMAGED}")

    def _read_header(self) -> tuple[dict, int]:
        """The header (checked to describe tensors) and where the data starts; a damaged file is one line."""
        with reading(self.path, WHAT, DAMAGED):
            size = os.fstat(self.fh.fileno()).st_size
            raw = self.fh.read(8)
            if len(raw) < 8:
                raise self._damaged(f"{size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise self._damaged(f"its header length {n} reaches past the end of the file ({size} bytes)")
            try:
                header = json.loads(self.fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self._damaged("its header is not valid JSON") from None
            if not isinstance(header, dict):
                raise self._damaged("its header is not a mapping of tensors")
            header.pop("__metadata__", None)
            for key, entry in header.items():
                ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                      and _ints(entry.get("shape")) and _ints(entry.get("data_offsets"))
                      and len(entry["data_offsets"]) == 2)
                if not ok:
                    raise self._damaged(f"the header entry of tensor '{key}' is malformed")
        return header, 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read_into(self, key: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        """out <- tensor[key][index] (converted to out's dtype)."""
        entry = self.header[key]
        dtype = DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
        contiguous = all(s.start == 0 and s.stop == n for s, n in zip(index[1:], shape[1:]))
        if dtype is None or not contiguous or not shape:
            out.copy_(self._slow(key, index))
            return
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        first, last = index[0].start, index[0].stop
        nbytes = (last - first) * row_bytes
        if nbytes == 0:
            return
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(tuple(out.shape), dtype=dtype)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        begin = entry["data_offsets"][0]
        with reading(self.path, WHAT, DAMAGED):  # e.g. an I/O error of a network file system
            self.fh.seek(self.data_start + begin + first * row_bytes)
            got = 0
            while got < nbytes:
                n = self.fh.readinto(view[got:])
                if not n:
                    raise UserError(f"{self.path}: truncated: tensor '{key}' ends past the end of the file; the "
                                    "download or copy is incomplete: download or save it again")
                got += n
        if not direct:
            out.copy_(buf)

    def _slow(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        with reading(self.path, WHAT, DAMAGED):
            if self._fallback is None:
                from safetensors import safe_open

                self._fallback = safe_open(str(self.path), framework="pt")
            return self._fallback.get_slice(key)[index]

    def close(self) -> None:
        self.fh.close()
        self._fallback = None


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)

