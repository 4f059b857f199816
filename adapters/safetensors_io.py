"""Header-first, bounded reading of .safetensors bytes (float dtypes only; never pickle)."""
from __future__ import annotations

import json
import math
import struct
import threading
from pathlib import Path

import torch
from safetensors.torch import load as _st_load

from .errors import TOO_LARGE, AdapterError

MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
MAX_DIMS = 8
FLOAT_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MAX_REUSED_BYTES = 1 << 30  # larger files get a buffer of their own (a loader thread keeps at most this;
# Llama-3-8B at r=64 on all 7 projections in fp32 is 672 MB)
_scratch = threading.local()
_INT_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}

WEIGHTS_FILE = "adapter_model.safetensors"


def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise AdapterError(f"{WEIGHTS_FILE}: the header lists tensor {k!r} twice", k)
        out[k] = v
    return out


def parse_header(data: bytes | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
                 ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate the header and data layout of a whole safetensors buffer -> {key: (dtype, shape)}."""
    return parse_layout(data, max_header_bytes)[0]


def parse_layout(data: bytes | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
                 ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, int]]:
    """parse_header's work -> ({key: (dtype, shape)}, {key: byte offset of its data in `data`})."""
    size = len(data)
    if size < 8:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated ({size} bytes; the 8-byte header length is missing)",
                           WEIGHTS_FILE)
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > max_header_bytes:
        raise AdapterError(f"{WEIGHTS_FILE}: header length {n} exceeds the {max_header_bytes}-byte limit",
                           WEIGHTS_FILE, TOO_LARGE)
    if 8 + n > size:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: the header claims {n} bytes but the file has "
                           f"{size - 8} after the length field", WEIGHTS_FILE)
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"), object_pairs_hook=_no_dupes)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # AdapterError (_no_dupes) passes through
        raise AdapterError(f"{WEIGHTS_FILE}: the header is not valid JSON ({exc})", WEIGHTS_FILE) from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE}: the header must be a JSON object", WEIGHTS_FILE)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise AdapterError(f"{WEIGHTS_FILE}: __metadata__ must map strings to strings", "__metadata__")
    if len(header) > MAX_TENSORS:
        raise AdapterError(f"{WEIGHTS_FILE} has {len(header)} tensors; the limit is {MAX_TENSORS}",
                           WEIGHTS_FILE, TOO_LARGE)
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    begins: dict[str, int] = {}
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise AdapterError(f"{WEIGHTS_FILE}: header entry for {key!r} is not an object", key)
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype in _INT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {dtype}; LoRA weights must be floating point "
                               "(F16, BF16, F32 or F64)", key)
        if dtype not in FLOAT_ITEMSIZE:
            raise AdapterError(f"tensor {key!r} has unsupported dtype {dtype!r}; allowed: F16, BF16, F32, F64",
                               key)
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise AdapterError(f"tensor {key!r} has an invalid shape {shape!r} in the header", key)
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise AdapterError(f"tensor {key!r} has data_offsets {offs!r} outside the {data_len}-byte data "
                               "section (truncated or corrupt file)", key)
        if offs[1] - offs[0] != math.prod(shape) * FLOAT_ITEMSIZE[dtype]:
            raise AdapterError(f"tensor {key!r}: data_offsets span {offs[1] - offs[0]} bytes but shape "
                               f"{shape} of {dtype} needs {math.prod(shape) * FLOAT_ITEMSIZE[dtype]}", key)
        spans.append((offs[0], offs[1], key))
        out[key] = (dtype, tuple(shape))
        begins[key] = 8 + n + offs[0]
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:  # the format requires tensors to tile the data section with no gap or overlap
            raise AdapterError(f"tensor {key!r} overlaps or leaves a gap in the data section", key)
        end = stop
    if end != data_len:
        raise AdapterError(f"{WEIGHTS_FILE}: the data section has {data_len} bytes but the tensors cover "
                           f"{end} (truncated or corrupt file)", WEIGHTS_FILE)
    return out, begins


def read_bytes(path: Path, max_bytes: int, name: str) -> bytes:
    """Read a whole file after checking its size against a cap (413 when over)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{name} is {size} bytes; the limit is {max_bytes}", name, TOO_LARGE)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after stat
        raise AdapterError(f"{name} is larger than the {max_bytes}-byte limit", name, TOO_LARGE)
    return data


def load_safetensors(data: bytes | memoryview, max_header_bytes: int = MAX_HEADER_BYTES,
                     layout: tuple | None = None) -> dict[str, torch.Tensor]:
    """Validate the header ourselves, then decode: a writable buffer (see read_reusing) is viewed in place, no
    copy; immutable bytes (uploads) go through `safetensors`' own decoder. layout: parse_layout(data) when the
    caller already has it (the header is parsed once per load)."""
    header, begins = layout if layout is not None else parse_layout(data, max_header_bytes)
    if isinstance(data, memoryview) and not data.readonly:
        return _views(data, header, begins)
    try:
        tensors = _st_load(data)
    except Exception as exc:  # the library's own checks; our parse should have caught everything first
        raise AdapterError(f"{WEIGHTS_FILE} could not be decoded ({exc})", WEIGHTS_FILE) from exc
    if tensors.keys() != header.keys():
        raise AdapterError(f"{WEIGHTS_FILE}: decoded tensors differ from the header", WEIGHTS_FILE)
    return tensors


def _views(data: memoryview, header: dict[str, tuple[str, tuple[int, ...]]],
           begins: dict[str, int]) -> dict[str, torch.Tensor]:
    """Tensors viewing `data` at the offsets parse_layout checked (the spans tile the data section exactly)."""
    out = {}
    for key, (dtype, shape) in header.items():
        count = math.prod(shape)
        t = (torch.frombuffer(data, dtype=TORCH_DTYPES[dtype], count=count, offset=begins[key]) if count
             else torch.empty(0, dtype=TORCH_DTYPES[dtype]))
        out[key] = t.view(shape)
    return out


def read_reusing(path: Path, max_bytes: int, name: str) -> memoryview:
    """read_bytes into this thread's reusable buffer: a fresh 100 MB bytes object costs more in page faults than
    the copy from the page cache itself. The view is valid until this thread's next call (decode and copy out
    before that)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{name} is {size} bytes; the limit is {max_bytes}", name, TOO_LARGE)
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size + 1:
        buf = bytearray(size + 1)
        if size < MAX_REUSED_BYTES:
            _scratch.buf = buf
    with open(path, "rb") as f:
        got = f.readinto(memoryview(buf)[:size + 1])  # one byte more than stat said: a file that grew is refused
    if got != size:
        raise AdapterError(f"{name} changed size while it was read; try again", name)
    return memoryview(buf)[:size]
