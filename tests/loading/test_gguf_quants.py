"""GGUF tensor conversion (issue #12): exact repacking into MLX affine quantization, float types,
dequantize + re-quantize / keep-float for the other types, errors.

Raw blocks are built with numpy straight from the format (random bytes = random codes over the whole code
range, with finite float16 scale fields written over them), and compared with gguf-py's own
`gguf.quants.dequantize`, the reference every other runtime (diffusers, ComfyUI-GGUF) follows.
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest

from flux_1.loading import gguf_quants
from flux_1.loading.gguf_quants import LOSSLESS_TYPES, REQUANTIZE, convert_tensor

T = gguf.GGMLQuantizationType

# Byte offsets of the float16 scale fields inside one block, per type (from gguf-py's quants.py layouts).
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "IQ3_S": [0],
    "IQ3_XXS": [0], "IQ2_S": [0], "IQ2_XS": [0], "IQ2_XXS": [0], "IQ1_S": [0], "IQ1_M": [],
    "TQ1_0": [52], "TQ2_0": [64], "MXFP4": [], "NVFP4": [],
}
BITS = {"Q8_0": 8, "Q4_0": 4, "Q5_0": 5, "Q4_1": 4, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}


def random_f16(rng, n: int, wide: bool) -> np.ndarray:
    """Finite float16 scales: signed, over many magnitudes (subnormals and zero included) when `wide`,
    else positive weight-like magnitudes."""
    if not wide:
        return (np.abs(rng.standard_normal(n)) * 0.01 + 1e-3).astype(np.float16)
    v = rng.standard_normal(n) * 10.0 ** rng.integers(-7, 4, n)
    v = v.astype(np.float16)
    v[: max(1, n // 50)] = 0.0
    v[~np.isfinite(v)] = 1.0
    return v


def random_raw(name: str, rows: int, cols: int, seed: int = 0, wide: bool = True) -> np.ndarray:
    """A (rows, bytes_per_row) uint8 tensor of random blocks of `name`, as GGUFReader exposes it."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[T[name]]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        raw[:, at:at + 2] = random_f16(rng, raw.shape[0], wide).view(np.uint8).reshape(-1, 2)
    if name == "IQ1_M":  # its float16 scale is spread over the top nibbles of 4 uint16s: keep it finite
        raw[:, 55] = (raw[:, 55] & 0x0F) | 0x20
    if name == "MXFP4":
        raw[:, 0] = rng.integers(110, 130, raw.shape[0])
    if name == "NVFP4":
        raw[:, :4] = rng.integers(0x20, 0x50, (raw.shape[0], 4))
    return raw.reshape(rows, -1)


def dequantized(c) -> np.ndarray:
    a = c.arrays
    return np.array(mx.dequantize(a["weight"], a["scales"], a["biases"], group_size=c.quant["group_size"],
                                  bits=c.quant["bits"]).astype(mx.float32))


def codes_of(c) -> np.ndarray:
    """The unsigned codes, read back through MLX itself (scale 1, bias 0)."""
    a = c.arrays
    ones = mx.ones(a["scales"].shape, dtype=mx.float32)
    return np.array(mx.dequantize(a["weight"], ones, 0 * ones, group_size=c.quant["group_size"],
                                  bits=c.quant["bits"])).astype(np.int64)


def bits_of(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Lossless types


def shapes_for(name: str):
    return [(2, 256), (3, 512), (1, 768)] if name.endswith("_K") else [(3, 32), (2, 96), (5, 256)]


@pytest.mark.parametrize("name", sorted(LOSSLESS_TYPES))
def test_lossless_types_are_bit_exact(name):
    bits = BITS[name]
    seen = set()
    for i, (rows, cols) in enumerate(shapes_for(name)):
        raw = random_raw(name, rows, cols, seed=i)
        ref = gguf.quants.dequantize(raw, T[name])
        c = convert_tensor(raw, T[name], (rows, cols), mx.float32)
        assert c.source_type == name and c.exact
        assert c.quant == {"group_size": 32, "bits": bits, "mode": "affine"}
        w, s, b = c.arrays["weight"], c.arrays["scales"], c.arrays["biases"]
        assert (w.dtype, w.shape) == (mx.uint32, (rows, cols * bits // 32))
        assert s.dtype == b.dtype == mx.float32 and s.shape == b.shape == (rows, cols // 32)
        out = dequantized(c)
        assert np.array_equal(out, ref)
        # bit for bit, once -0.0 is read as +0.0 (x + 0.0 does exactly that)
        assert np.array_equal(bits_of(out + np.float32(0)), bits_of(ref + np.float32(0)))
        if name not in ("Q8_0", "Q4_0", "Q5_0"):
            # types with an explicit min (or K-quant bias): bit for bit, signed zeros included
            assert np.array_equal(bits_of(out), bits_of(ref))
        seen |= set(np.unique(codes_of(c)).tolist())
    assert seen == set(range(2 ** bits))  # the whole code range was exercised


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_lossless_on_gguf_quantized_weights(name):
    """Blocks written by gguf-py's own quantizer from Gaussian weights (the real-file case)."""
    w = np.random.default_rng(3).standard_normal((16, 512)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(w, T[name])
    ref = gguf.quants.dequantize(raw, T[name])
    out = dequantized(convert_tensor(raw, T[name], w.shape, mx.float32))
    assert np.array_equal(out, ref)
    if name == "Q8_0":  # its quantizer writes d >= 0: no -0.0 either
        assert np.array_equal(bits_of(out), bits_of(ref))


def test_signed_zero_is_the_only_difference():
    """Q4_0 with d < 0 and code 8: gguf-py gives -0.0, MLX's scale*8 + (-8*scale) gives +0.0."""
    raw = np.zeros((1, 18), np.uint8)
    raw[0, :2] = np.array([-0.5], np.float16).view(np.uint8)
    raw[0, 2:] = 0x88  # every code 8
    ref = gguf.quants.dequantize(raw, T.Q4_0)
    out = dequantized(convert_tensor(raw, T.Q4_0, (1, 32), mx.float32))
    assert np.all(np.signbit(ref)) and not np.any(np.signbit(out)) and np.array_equal(out, ref)


@pytest.mark.parametrize("name", sorted(LOSSLESS_TYPES))
def test_bfloat16_scales_error(name):
    """bf16 scales/biases: 8-bit significands. Measured (docs/QUANTIZATION.md): rel. RMS error 1.6-1.8e-3
    with float32 arithmetic (same as casting the weights to bf16), 2.8-3.9e-3 through mx.dequantize's
    bf16 arithmetic on the CPU; float16 scales make the non-K types exact (d and m are float16)."""
    cols = 1024
    raw = random_raw(name, 32, cols, seed=5, wide=False)
    ref = gguf.quants.dequantize(raw, T[name])
    c = convert_tensor(raw, T[name], (32, cols), mx.bfloat16)
    assert not c.exact and c.arrays["scales"].dtype == c.arrays["biases"].dtype == mx.bfloat16
    a, q = c.arrays, c.quant
    f32 = np.array(mx.dequantize(a["weight"], a["scales"].astype(mx.float32), a["biases"].astype(mx.float32),
                                 group_size=q["group_size"], bits=q["bits"]))
    assert rel(f32, ref) < 2.2e-3
    assert rel(dequantized(c), ref) < 5e-3
    f16 = convert_tensor(raw, T[name], (32, cols), mx.float16)
    a = f16.arrays
    f16_out = np.array(mx.dequantize(a["weight"], a["scales"].astype(mx.float32), a["biases"].astype(mx.float32),
                                     group_size=q["group_size"], bits=q["bits"]))
    if name.endswith("_K"):
        assert rel(f16_out, ref) < 4e-4
    else:
        assert np.array_equal(f16_out, ref)


def test_chunked_conversion_equals_whole(monkeypatch):
    raw = random_raw("Q5_K", 40, 512, seed=9)
    whole = convert_tensor(raw, T.Q5_K, (40, 512), mx.float32)
    monkeypatch.setattr(gguf_quants, "_CHUNK_BYTES", 3 * 512 * 4)  # 3 rows per chunk
    parts = convert_tensor(raw, T.Q5_K, (40, 512), mx.float32)
    for k in ("weight", "scales", "biases"):
        assert np.array_equal(np.array(whole.arrays[k]), np.array(parts.arrays[k]))
    req = convert_tensor(random_raw("Q6_K", 40, 512), T.Q6_K, (40, 512), mx.float32)
    monkeypatch.setattr(gguf_quants, "_CHUNK_BYTES", 64 << 20)
    req_whole = convert_tensor(random_raw("Q6_K", 40, 512), T.Q6_K, (40, 512), mx.float32)
    for k in ("weight", "scales", "biases"):
        assert np.array_equal(np.array(req.arrays[k]), np.array(req_whole.arrays[k]))


def test_through_gguf_reader(tmp_path):
    """The shape convention end to end: GGUFWriter/GGUFReader, shape = reversed(ReaderTensor.shape)."""
    w8 = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    k4 = random_raw("Q4_K", 6, 512, seed=2)
    bf = gguf.quants.quantize(w8, T.BF16)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor("a.weight", gguf.quants.quantize(w8, T.Q8_0), raw_dtype=T.Q8_0)
    writer.add_tensor("b.weight", k4, raw_dtype=T.Q4_K)
    writer.add_tensor("c.weight", bf, raw_dtype=T.BF16)
    writer.add_tensor("d.weight", w8.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        c = convert_tensor(t.data, t.tensor_type, shape, mx.float32)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        out = dequantized(c) if c.quant else np.array(c.arrays["weight"])
        assert out.shape == ref.shape == shape and np.array_equal(out, ref) and c.exact, t.name


# ------------------------------------------------------------------------------------------------
# Float types


def test_float_types():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 48)) * 3).astype(np.float32)
    f16 = w.astype(np.float16)
    bf16 = gguf.quants.quantize(w, T.BF16)  # uint8 (8, 96), as GGUFReader exposes BF16
    for data, t, dtype, exact in [
        (w, T.F32, mx.float32, True), (f16, T.F16, mx.float32, True), (bf16, T.BF16, mx.float32, True),
        (bf16, T.BF16, mx.bfloat16, True), (f16, T.F16, mx.float16, True), (f16, T.F16, mx.bfloat16, False),
        (w, T.F32, mx.bfloat16, False),
    ]:
        c = convert_tensor(data, t, (8, 48), dtype)
        assert c.quant is None and c.exact == exact and set(c.arrays) == {"weight"}
        out = c.arrays["weight"]
        assert out.dtype == dtype and out.shape == (8, 48)
        ref = gguf.quants.dequantize(data, t)
        if exact:
            assert np.array_equal(bits_of(np.array(out.astype(mx.float32))), bits_of(ref))
        else:
            assert np.array_equal(np.array(out.astype(mx.float32)),
                                  np.array(mx.array(ref).astype(dtype).astype(mx.float32)))
    one_d = convert_tensor(w[0], T.F32, (48,), mx.float32)  # biases and norms are 1-D F32
    assert one_d.arrays["weight"].shape == (48,)


# ------------------------------------------------------------------------------------------------
# Re-quantized types

# Own error scale: MLX affine's relative error at the type's nominal bits (docs/QUANTIZATION.md,
# Gaussian 1024 x 3072): a b-bit format's own error is of that order.
AFFINE_ERROR = {2: 0.395, 3: 0.19, 4: 0.091, 5: 0.044, 6: 0.0216, 8: 0.0054}
NOMINAL_BITS = {"Q6_K": 6, "Q3_K": 3, "Q2_K": 2, "IQ4_NL": 4, "IQ4_XS": 4, "IQ3_S": 3, "IQ3_XXS": 3,
                "IQ2_S": 2, "IQ2_XS": 2, "IQ2_XXS": 2, "IQ1_M": 2, "IQ1_S": 2, "TQ2_0": 2, "TQ1_0": 2,
                "MXFP4": 4, "NVFP4": 4}


def _measure_requantize(name: str, rows: int = 32, cols: int = 1024, seed: int = 1) -> dict[int, float]:
    """{bits: relative RMS error of mx.quantize (group 32) against gguf-py's dequantization} on random
    blocks of `name`: the measurement behind `REQUANTIZE`."""
    ref = gguf.quants.dequantize(random_raw(name, rows, cols, seed=seed, wide=False), T[name])
    errs = {}
    for bits in (2, 3, 4, 5, 6, 8):
        q = mx.quantize(mx.array(ref), group_size=32, bits=bits)
        errs[bits] = rel(np.array(mx.dequantize(*q, group_size=32, bits=bits)), ref)
    return errs


@pytest.mark.parametrize("name", sorted(REQUANTIZE))
def test_requantize_policy(name):
    bits, group = REQUANTIZE[name]
    raw = random_raw(name, 32, 1024, seed=1, wide=False)
    ref = gguf.quants.dequantize(raw, T[name])
    c = convert_tensor(raw, T[name], (32, 1024), mx.float32)
    assert c.quant == {"group_size": group, "bits": bits, "mode": "affine"} and not c.exact
    assert c.source_type == name
    err = rel(dequantized(c), ref)
    assert err <= AFFINE_ERROR[NOMINAL_BITS[name]] / 2  # the selection rule, re-checked
    assert err == pytest.approx(_measure_requantize(name)[bits], rel=1e-6)
    bf = convert_tensor(raw, T[name], (32, 1024), mx.bfloat16)
    assert bf.arrays["scales"].dtype == mx.bfloat16
    assert rel(dequantized(bf), ref) <= AFFINE_ERROR[NOMINAL_BITS[name]] / 2 + 5e-3


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ2_XXS", "TQ1_0"])
def test_float_policy(name):
    raw = random_raw(name, 4, 512, seed=4, wide=False)
    ref = gguf.quants.dequantize(raw, T[name])
    c = convert_tensor(raw, T[name], (4, 512), mx.float32, policy="float")
    assert c.quant is None and c.exact and c.source_type == name
    assert np.array_equal(bits_of(np.array(c.arrays["weight"])), bits_of(ref))
    b = convert_tensor(raw, T[name], (4, 512), mx.bfloat16, policy="float")
    assert b.arrays["weight"].dtype == mx.bfloat16 and not b.exact
    assert np.array_equal(np.array(b.arrays["weight"].astype(mx.float32)),
                          np.array(mx.array(ref).astype(mx.bfloat16).astype(mx.float32)))
    # lossless types ignore the policy: always repacked
    k = convert_tensor(random_raw("Q4_K", 4, 512), T.Q4_K, (4, 512), mx.float32, policy="float")
    assert k.quant is not None and k.exact


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("t", [T.Q8_1, T.Q8_K, T.I32, T.I8, T.F64, 999])
def test_unsupported_type_is_a_value_error_naming_it(t):
    name = t.name if isinstance(t, T) else "999"
    with pytest.raises(ValueError, match=name):
        convert_tensor(np.zeros((1, 64), np.uint8), t, (1, 16), mx.float32)


def test_bad_sizes():
    raw = random_raw("Q8_0", 2, 64)
    with pytest.raises(ValueError, match="bytes"):
        convert_tensor(raw[:, :-1], T.Q8_0, (2, 64), mx.float32)
    with pytest.raises(ValueError, match="block size"):
        convert_tensor(raw, T.Q8_0, (2, 68), mx.float32)
    with pytest.raises(ValueError, match="policy"):
        convert_tensor(raw, T.Q8_0, (2, 64), mx.float32, policy="fast")
