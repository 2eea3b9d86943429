"""GGUF tensors -> MLX arrays: exact repacking of the affine GGUF types, dequantize(+requantize) of the rest.

One function, `convert_tensor(raw, ggml_type, shape, scale_dtype, policy)`, turns one GGUF tensor into the
arrays of one MLX layer. See docs/QUANTIZATION.md ("GGUF") for the measured errors.

Conventions:
- `raw` is the tensor as gguf-py's `GGUFReader` exposes it (`ReaderTensor.data`): for quantized types and
  BF16 uint8 of shape (*rows, bytes_per_row); for F32/F16 the typed values. Any array with the right
  number of bytes is accepted (it is only viewed, never copied whole).
- `shape` is the LOGICAL shape in our row-major (torch/MLX) order: (out, in) for a linear weight, i.e.
  `tuple(reversed(ReaderTensor.shape))` (GGUF stores ggml `ne`, innermost first). Blocks run along the
  last axis.

Lossless types (`LOSSLESS_TYPES`): every 32 consecutive values of a row share one scale and one offset, so
they are MLX affine quantization at group size 32 (`w = scale * code + bias`, unsigned codes packed
little-endian into uint32, as `mx.quantize` writes them):

| type | GGUF value | MLX code | scale | bias |
|---|---|---|---|---|
| Q8_0 | d * q, q int8 | q + 128 (8-bit) | d | -(128 d) |
| Q4_0 | d * (q - 8) | q (4-bit) | d | -(8 d) |
| Q5_0 | d * (q - 16) | q (5-bit) | d | -(16 d) |
| Q4_1 | d * q + m | q (4-bit) | d | m |
| Q5_1 | d * q + m | q (5-bit) | d | m |
| Q4_K | (d sc_j) q - dmin m_j | q (4-bit) | d * sc_j | -(dmin * m_j) |
| Q5_K | (d sc_j) q - dmin m_j | q (5-bit) | d * sc_j | -(dmin * m_j) |

Why this is bit-exact in float32: d, m, dmin are float16 (11-bit significands) and sc_j, m_j are 6-bit, so
d*sc_j (17 bits), dmin*m_j, and scale*code (at most 22 bits) are all exact float32 products; gguf-py's
formula and MLX's `scale * code + bias` therefore both round exactly once, at the same addition, to the
same value (fused multiply-add or not). For Q8_0/Q4_0/Q5_0 `d*(q+o) - o*d` is exactly `d*q` (a
representable difference is never rounded). The one difference in bits: where gguf-py gives -0.0 (zero
code with a negative d, which the GGUF quantizer writes for Q4_0/Q5_0), MLX gives +0.0 (x + (-x) is +0.0
in IEEE arithmetic, and no choice of scale/bias can avoid it since the zero is mid-range). Equal values,
so no matmul can tell; `Converted.exact` means equal float32 values (+0.0 == -0.0).

With `scale_dtype` bfloat16 the scales and biases round to 8-bit significands (relative error <= 2^-9 per
scale): measured in docs/QUANTIZATION.md; `exact` is then False.

Other quantized types (Q2_K, Q3_K, Q6_K: 16-value sub-blocks; the IQ, TQ and FP4 types): gguf-py
dequantizes them to float32, then `policy="requantize"` (default) quantizes with `mx.quantize` at the
setting of `REQUANTIZE` (measured errors there), `policy="float"` keeps them in `scale_dtype`. Both work
on bounded row chunks, so no whole-tensor float32 copy of a large tensor is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import mlx.core as mx
import numpy as np

__all__ = ["Converted", "convert_tensor", "LOSSLESS_TYPES", "FLOAT_TYPES", "REQUANTIZE", "POLICIES",
           "supported_types"]


@dataclass(frozen=True)
class Converted:
    """One converted tensor: `arrays` are the layer's parameters ({"weight"} or {"weight" uint32 codes,
    "scales", "biases"}), `quant` the MLX quantization ({"group_size", "bits", "mode"}) or None for a float
    weight, `source_type` the GGUF type name, `exact` True when the MLX values equal gguf-py's float32
    dequantization (see the module docstring for +0.0/-0.0)."""

    arrays: dict[str, mx.array]
    quant: dict | None
    source_type: str
    exact: bool


# type name -> (bits, GGUF zero offset or None when the block has an explicit min)
_LOSSLESS = {
    "Q8_0": 8, "Q4_0": 4, "Q5_0": 5, "Q4_1": 4, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5,
}
LOSSLESS_TYPES: frozenset[str] = frozenset(_LOSSLESS)
FLOAT_TYPES: frozenset[str] = frozenset({"F32", "F16", "BF16"})
LOSSLESS_GROUP = 32

# Re-quantization settings (bits, group size) for the types MLX affine cannot hold exactly: the fewest
# bits (of 3/4/5/6/8, the widths flux_1 offers) whose re-quantization error against gguf-py's dequantized
# values is at most half the type's own error scale (taken as MLX affine's error at the type's nominal
# bits: a b-bit format cannot beat b-bit quantization by much), so the total error grows by <= 12 %
# (sqrt(1 + 1/4)). Measured in docs/QUANTIZATION.md ("GGUF: re-quantized types"); `_measure_requantize`
# in tests/loading/test_gguf_quants.py reproduces the numbers.
REQUANTIZE: dict[str, tuple[int, int]] = {
    "Q6_K": (8, 32),
    "Q3_K": (4, 32),
    "Q2_K": (3, 32),
    "IQ4_NL": (5, 32),
    "IQ4_XS": (5, 32),
    "IQ3_S": (4, 32),
    "IQ3_XXS": (5, 32),
    "IQ2_S": (3, 32),
    "IQ2_XS": (3, 32),
    "IQ2_XXS": (3, 32),
    "IQ1_M": (3, 32),
    "IQ1_S": (3, 32),
    "TQ2_0": (3, 32),
    "TQ1_0": (3, 32),
    "MXFP4": (5, 32),
    "NVFP4": (6, 32),
}
POLICIES = ("requantize", "float")

# Row chunks are sized so one chunk's float32 values stay under this many bytes.
_CHUNK_BYTES = 64 << 20


def supported_types() -> frozenset[str]:
    """Every GGUF type name `convert_tensor` accepts."""
    return LOSSLESS_TYPES | FLOAT_TYPES | frozenset(REQUANTIZE)


def _type_name(ggml_type) -> str:
    try:
        return gguf.GGMLQuantizationType(int(ggml_type)).name
    except (ValueError, TypeError):
        raise ValueError(f"unknown GGUF tensor type {ggml_type!r}") from None


def convert_tensor(raw: np.ndarray, ggml_type: gguf.GGMLQuantizationType, shape: tuple[int, ...],
                   scale_dtype: mx.Dtype, policy: str = "requantize") -> Converted:
    """One GGUF tensor -> MLX arrays.

    raw: `ReaderTensor.data` (bytes of the tensor; see the module docstring). shape: the logical shape in
    row-major order, `tuple(reversed(ReaderTensor.shape))`. scale_dtype: the dtype of float weights and of
    quantization scales/biases (the model's compute dtype). policy: "requantize" or "float", for the types
    that cannot be repacked exactly (lossless types are always repacked; float types always stay float).
    Raises ValueError naming the type for unknown/unsupported types, a wrong byte count or a row width that
    is not a whole number of blocks.
    """
    name = _type_name(ggml_type)
    qtype = gguf.GGMLQuantizationType[name]
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if name not in supported_types():
        raise ValueError(f"GGUF tensor type {name} is not supported (supported: "
                         f"{', '.join(sorted(supported_types()))})")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"{name} tensor: bad shape {shape}")
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{name} tensor of shape {shape}: the row width {cols} is not a multiple of the "
                         f"{name} block size {block}")
    row_bytes = cols // block * type_size
    data = np.asarray(raw)
    if data.nbytes != rows * row_bytes:
        raise ValueError(f"{name} tensor of shape {shape} needs {rows * row_bytes} bytes, got {data.nbytes}")
    data = data.reshape(-1).view(np.uint8).reshape(rows, row_bytes)

    if name in FLOAT_TYPES:
        return _float(data, name, shape, scale_dtype)
    if name in LOSSLESS_TYPES and len(shape) >= 2:
        return _repack(data, name, shape, scale_dtype)
    if policy == "requantize" and name in REQUANTIZE and len(shape) >= 2:
        bits, group = REQUANTIZE[name]
        if cols % group == 0:
            return _requantize(data, qtype, shape, scale_dtype, bits, group)
    return _dequantized_float(data, qtype, shape, scale_dtype)


# ------------------------------------------------------------------------------------------------
# Float tensors


def _float(data: np.ndarray, name: str, shape: tuple[int, ...], scale_dtype: mx.Dtype) -> Converted:
    if name == "BF16":
        arr = mx.array(data.view(np.uint16)).view(mx.bfloat16)
        src = mx.bfloat16
    else:
        arr = mx.array(data.view(np.float32 if name == "F32" else np.float16))
        src = mx.float32 if name == "F32" else mx.float16
    arr = arr.reshape(shape).astype(scale_dtype)
    mx.eval(arr)
    return Converted({"weight": arr}, None, name, _holds(src, scale_dtype))


def _holds(src: mx.Dtype, dst: mx.Dtype) -> bool:
    """Whether every finite value of `src` is a value of `dst`."""
    return src == dst or dst == mx.float32


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _dequantized_float(data: np.ndarray, qtype, shape: tuple[int, ...], scale_dtype: mx.Dtype) -> Converted:
    """gguf-py's float32 dequantization, kept as float in `scale_dtype` (row chunk by row chunk)."""
    rows, cols = data.shape[0], shape[-1]
    parts = []
    for a, b in _row_chunks(rows, cols):
        part = mx.array(gguf.quants.dequantize(data[a:b], qtype)).astype(scale_dtype)
        mx.eval(part)
        parts.append(part)
    weight = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).reshape(shape)
    mx.eval(weight)
    return Converted({"weight": weight}, None, qtype.name, scale_dtype == mx.float32)


def _requantize(data: np.ndarray, qtype, shape: tuple[int, ...], scale_dtype: mx.Dtype, bits: int,
                group: int) -> Converted:
    """gguf-py's dequantization, re-quantized with `mx.quantize` (row chunk by row chunk: MLX affine
    groups run along rows, so chunking rows changes nothing)."""
    rows, cols = data.shape[0], shape[-1]
    parts = []
    for a, b in _row_chunks(rows, cols):
        w = mx.array(gguf.quants.dequantize(data[a:b], qtype)).astype(scale_dtype)
        q = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(q)
        parts.append(q)
        del w
    arrays = {}
    for i, key in enumerate(("weight", "scales", "biases")):
        cat = parts[0][i] if len(parts) == 1 else mx.concatenate([p[i] for p in parts], axis=0)
        arrays[key] = cat.reshape(*shape[:-1], cat.shape[-1])
    mx.eval(arrays)
    return Converted(arrays, {"group_size": group, "bits": bits, "mode": "affine"}, qtype.name, False)


# ------------------------------------------------------------------------------------------------
# Exact repacking (vectorised over blocks; row chunks bound the temporaries)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block, as float32 (nblocks, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16k) packed bytes -> (n, 32k) values: for each 16-byte run, low nibbles then high nibbles
    (the Q4_0/Q4_1/Q5_0/Q5_1 order)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: (n, 4) bytes = one little-endian uint32, bit i is value i's fifth bit -> (n, 32)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")  # bit i of the little-endian word = value i


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 packed bytes -> (sc, m), 8 six-bit values each (gguf-py's get_scale_min)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _decode(blocks: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nblocks, type_size) bytes -> codes (nblocks, block) uint8 in MLX's unsigned form, and per 32-group
    scale and bias (nblocks, block // 32) float32, such that scale * code + bias is gguf-py's value."""
    n = blocks.shape[0]
    if name == "Q8_0":
        d = _f16(blocks, 0)
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, d, -(d * np.float32(128))
    if name in ("Q4_0", "Q5_0"):
        d = _f16(blocks, 0)
        if name == "Q4_0":
            codes, off = _nibbles(blocks[:, 2:]), 8
        else:
            codes, off = _nibbles(blocks[:, 6:]) | (_high_bits32(blocks[:, 2:6]) << np.uint8(4)), 16
        return codes, d, -(d * np.float32(off))
    if name in ("Q4_1", "Q5_1"):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        if name == "Q4_1":
            codes = _nibbles(blocks[:, 4:])
        else:
            codes = _nibbles(blocks[:, 8:]) | (_high_bits32(blocks[:, 4:8]) << np.uint8(4))
        return codes, d, m
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        scale = d * sc.astype(np.float32)          # exact: 11-bit x 6-bit significands
        bias = -(dmin * mn.astype(np.float32))     # exact, negated: gguf computes x - dmin*m
        qs = blocks[:, 16:] if name == "Q4_K" else blocks[:, 48:]
        # 4 runs of 32 bytes: low nibbles are sub-block 2j, high nibbles sub-block 2j + 1
        codes = (qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        codes = codes.reshape(n, 256)
        if name == "Q5_K":
            # 32 bytes: bit s of byte i is the fifth bit of value i of sub-block s
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            codes |= (qh & np.uint8(1)).reshape(n, 256) << np.uint8(4)
        return codes, scale, bias
    raise AssertionError(name)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) uint8 codes < 2**bits -> (rows, cols * bits // 32) uint32: a little-endian bit stream
    per row (value i at bits [bits*i, bits*(i+1))), MLX's affine packing for every width."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        pairs = codes.reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << np.uint8(4))).view(np.uint32)
    eights = codes.reshape(rows, cols // 8, 8)
    acc = eights[..., 0].astype(np.uint64)
    for i in range(1, 8):  # 8 positions, not blocks; temporaries of one byte per value at most
        acc |= eights[..., i].astype(np.uint64) << np.uint64(bits * i)
    out = acc.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]  # little-endian host bytes
    return np.ascontiguousarray(out).reshape(rows, cols * bits // 8).view(np.uint32)


def _repack(data: np.ndarray, name: str, shape: tuple[int, ...], scale_dtype: mx.Dtype) -> Converted:
    bits = _LOSSLESS[name]
    qtype = gguf.GGMLQuantizationType[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = data.shape[0], shape[-1]
    groups = cols // LOSSLESS_GROUP
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, groups), np.float32)
    biases = np.empty((rows, groups), np.float32)
    for a, b in _row_chunks(rows, cols):
        blocks = data[a:b].reshape(-1, type_size)
        codes, scale, bias = _decode(blocks, name)
        packed[a:b] = _pack(codes.reshape(b - a, cols), bits)
        scales[a:b] = scale.reshape(b - a, groups)
        biases[a:b] = bias.reshape(b - a, groups)
        del codes, scale, bias
    lead = shape[:-1]
    arrays = {
        "weight": mx.array(packed).reshape(*lead, packed.shape[-1]),
        "scales": mx.array(scales).astype(scale_dtype).reshape(*lead, groups),
        "biases": mx.array(biases).astype(scale_dtype).reshape(*lead, groups),
    }
    mx.eval(arrays)
    return Converted(arrays, {"group_size": LOSSLESS_GROUP, "bits": bits, "mode": "affine"}, name,
                     scale_dtype == mx.float32)
