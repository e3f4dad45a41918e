"""Hostile files for tests: deflate bombs, lying .npy headers, sparse files, special files.

Bombs are written in well under a second whatever their inflated size: a deflate
block of zeros ended by a full flush compresses the same way every time, so the
block is compressed once and repeated; only the CRC-32 is computed over the whole.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CHUNK = 2**22


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """The .npy header (format 1.0) declaring `shape` and `dtype`: whatever follows it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


_ZERO_CRC: dict[tuple[int, int], int] = {}


def _crc_of_zeros(start: int, count: int) -> int:
    key = (start, count)
    if key not in _ZERO_CRC:
        crc, chunk, left = start, bytes(CHUNK), count
        while left > 0:
            crc = zlib.crc32(chunk[: min(left, CHUNK)], crc)
            left -= CHUNK
        _ZERO_CRC[key] = crc
    return _ZERO_CRC[key]


def _deflate(prefix: bytes, zeros: int) -> tuple[bytes, int, int]:
    """Raw deflate of `prefix` + `zeros` zero bytes: (compressed, crc32, inflated size), built from one block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)]
    full, rest = divmod(zeros, CHUNK)
    if full:
        block = compressor.compress(bytes(CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts.append(block * full)
    parts.append(compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FINISH))
    crc = _crc_of_zeros(zlib.crc32(prefix), zeros)
    return b"".join(parts), crc, len(prefix) + zeros


def write_zip(path: Path, members: Sequence[tuple[str, bytes, int]]) -> Path:
    """A zip of deflated members `(name, prefix, zeros)`: each holds `prefix` then `zeros` zero bytes.

    Members inflate to at most 4 GiB (no zip64), which every test here needs.
    """
    local, central = io.BytesIO(), io.BytesIO()
    for name, prefix, zeros in members:
        data, crc, size = _deflate(prefix, zeros)
        assert size < 2**32 and len(data) < 2**32, "write_zip makes members below 4 GiB"
        encoded = name.encode()
        offset = local.tell()
        local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(encoded), 0))
        local.write(encoded)
        local.write(data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                                  len(encoded), 0, 0, 0, 0, 0, offset))
        central.write(encoded)
    directory = central.getvalue()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), local.tell(), 0)
    path.write_bytes(local.getvalue() + directory + end)
    return path


def array_member(name: str, array: np.ndarray) -> tuple[str, bytes, int]:
    """A member holding `array` exactly (for write_zip)."""
    return name, npy_bytes(array), 0


def bomb_member(name: str, shape: tuple[int, ...], dtype: str = "<f4", payload: int | None = None) -> tuple[str, bytes, int]:
    """A member whose header declares `shape` and which inflates to `payload` zero bytes after it
    (default: exactly what the shape needs, a valid array of zeros)."""
    count = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    return name, npy_header(shape, dtype), count if payload is None else payload


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk space."""
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path
