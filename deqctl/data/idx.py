"""Reading the IDX format (the MNIST family's file format), plain or gzip-compressed.

Layout: two zero bytes, a type code byte, a byte giving the number of dimensions, then
one big-endian uint32 per dimension, then the values, big-endian, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

# IDX type code -> numpy dtype (big-endian where it matters)
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(raw: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Return the array stored in IDX bytes as a tensor (native byte order).

    Raises ValueError naming `source` if the header is malformed or the size does not match.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{source}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: IDX header truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{source}: IDX body has {len(raw) - header} bytes, header "
                         f"{dims} implies {expected}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # astype(native) copies, which also makes the array writable for torch
    return torch.from_numpy(arr.astype(dtype.newbyteorder("=")))


def read_idx(path: str | Path) -> torch.Tensor:
    """Return the array in the IDX file at `path` (gzip-compressed if it ends in .gz)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as fh:
        return parse_idx(fh.read(), str(p))


def encode_idx(array: np.ndarray | torch.Tensor) -> bytes:
    """Return the IDX encoding of a uint8 or int32 array (used by tests to write fixtures)."""
    arr = np.asarray(array)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    if arr.dtype not in codes:
        raise ValueError(f"encode_idx supports uint8 and int32, got {arr.dtype}")
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
