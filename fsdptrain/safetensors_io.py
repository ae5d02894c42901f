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
import struct
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """One open .safetensors file: its header, and reads of row ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self.fh.read(8))
            header = json.loads(self.fh.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fh.close()
            raise UserError(f"{self.path}: not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self._fallback = None

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
        self.fh.seek(self.data_start + begin + first * row_bytes)
        got = 0
        while got < nbytes:
            n = self.fh.readinto(view[got:])
            if not n:
                raise UserError(f"{self.path}: truncated: tensor '{key}' ends past the end of the file; "
                                "the download or copy is incomplete")
            got += n
        if not direct:
            out.copy_(buf)

    def _slow(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        if self._fallback is None:
            from safetensors import safe_open

            self._fallback = safe_open(str(self.path), framework="pt")
        return self._fallback.get_slice(key)[index]

    def close(self) -> None:
        self.fh.close()
        self._fallback = None

