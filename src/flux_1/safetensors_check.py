"""Validate a safetensors header before anything reads the data.

`mx.load` trusts the header more than the safetensors library does: it accepts overlapping or
gapped data offsets, float shapes (`[4.0]`), and returns F8_E4M3 / F8_E8M0 as raw uint8. Its
errors for the rest are RuntimeErrors worded for MLX developers. `check_header` reads only the
8-byte length and the JSON header (never the data), so it is cheap even on a 20 GB checkpoint,
and it refuses, in one line naming the file and the tensor:

- a path that is not a regular file (a directory, a FIFO: opening one would block forever);
- a header length past the end of the file or over 100 MB (the safetensors library's limit);
- a header that is not UTF-8 JSON, not an object, or has a key twice;
- `__metadata__` that is not an object of strings;
- a tensor entry without a known dtype, a shape of non-negative integers, or two integer offsets;
- data offsets that do not tile the data section exactly: in order, no gap, no overlap, nothing
  past the end or after the last tensor, each span exactly prod(shape) * itemsize bytes.

What it does not judge is whether a dtype suits the caller (an integer LoRA factor, say): that is
the caller's business, and `DTYPE_SIZES` / `FLOAT_DTYPES` are here for it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

# Every byte-sized safetensors dtype. Sub-byte ones (F4, F6_*) are refused as unknown.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# Dtypes that hold real floating-point values (F8_E8M0 is a power-of-two scale format, not a float).
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}

MAX_HEADER = 100_000_000


class HeaderError(ValueError):
    """A safetensors file whose header is malformed or does not match its data."""


def _fail(path, what: str, name: str | None = None) -> HeaderError:
    where = f"tensor {name!r}: " if name is not None else ""
    return HeaderError(f"{path}: {where}{what}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_header(path: str | Path) -> dict:
    """The parsed header of a safetensors file (tensor name -> {dtype, shape, data_offsets}, plus
    `__metadata__` when present), once it is known to describe the file's data exactly.
    Raises HeaderError (a ValueError) whose message starts with `f"{path}: "` (the path as given)
    and names the tensor where one is at fault."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a file"
        raise _fail(path, f"is {kind}, not a safetensors file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(path, f"{size} bytes: too short for a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER):
                raise _fail(path, f"header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise _fail(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")

    if header.get("__metadata__", {}) is None:  # mx.save_safetensors writes null when given no metadata
        header["__metadata__"] = {}
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map names to strings")

    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _fail(path, "entry is not an object", name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(path, f"unsupported dtype {dtype!r}", name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"shape {shape!r} is not a list of non-negative integers", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _fail(path, f"data_offsets {offsets!r} is not two integers", name)
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise _fail(path, f"data_offsets {offsets} do not span the {nbytes} bytes of {dtype} {shape}", name)
        spans.append((begin, end, name))

    data = size - 8 - n
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlap the previous tensor" if begin < at else f"leave a gap after byte {at}"
            raise _fail(path, f"data_offsets [{begin}, {end}] {what}", name)
        if end > data:
            what = f"run past the end of the data ({data} bytes): a truncated file?"
            raise _fail(path, f"data_offsets [{begin}, {end}] {what}", name)
        at = end
    if at != data:
        raise _fail(path, f"{data - at} bytes after the last tensor: not a safetensors file, or a corrupt header")
    return header
