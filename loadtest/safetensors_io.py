"""A minimal safetensors writer in numpy (F32, F16, BF16, ...), so making adapters needs no torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# numpy dtype -> safetensors dtype tag; bfloat16 has no numpy dtype and is passed as BF16Array.
DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


class BF16Array:
    """bfloat16 values held as their uint16 bit patterns (round to nearest even from float32)."""

    def __init__(self, values: np.ndarray):
        f = np.ascontiguousarray(values, dtype=np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(f)
        self.bits = np.where(nan, 0x7FC0, rounded).astype(np.uint16)
        self.shape = f.shape

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def _tag_and_bytes(t) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(t, BF16Array):
        return "BF16", t.shape, t.bits.astype("<u2").tobytes()
    a = np.asarray(t)
    tag = DTYPES.get(a.dtype)
    if tag is None:
        raise TypeError(f"dtype {a.dtype} is not supported by this safetensors writer")
    return tag, a.shape, np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def serialize(tensors: dict[str, object], metadata: dict[str, str] | None = None) -> bytes:
    """Bytes of a .safetensors file: u64-LE header length, JSON header (space-padded to 8 bytes), data."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tag, shape, data = _tag_and_bytes(tensors[name])
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def save_file(tensors: dict[str, object], path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write tensors to path; returns the file size in bytes."""
    data = serialize(tensors, metadata)
    Path(path).write_bytes(data)
    return len(data)
