"""Faster forms, for MLX's CPU backend, of the maths that spends its time in `exp`: the sigmoid-type
activations (tanh-GELU, SiLU) and attention's softmax. Equal to MLX's own ops within float32 rounding;
other backends keep MLX's ops (callers check `on_cpu()`).

Why: MLX 0.32's CPU `exp` is a scalar loop (its `tanh`, `sigmoid`, `softmax` cost as much or more), 9 ns
an element on one core here, where an elementwise add is 0.2 ns and numpy's SIMD exp 0.3 ns. `exp` below
is the textbook range reduction, x log2(e) = n + f with n an integer and |f| <= 1/2, then
2^f ~ a degree-6 polynomial and 2^n put into a float's exponent bits. Compiled together with the
arithmetic around it, a tanh-GELU or SiLU pass is 3.7-4.4x faster and a softmax 2.4x; its largest
relative error (3.9e-6 over [-80, 80]) is that of MLX's own `exp` (3.8e-6), and like it it returns 0
below about -87.5, inf above about 88.3 and NaN for NaN.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.0 / math.log(2.0)
# Taylor coefficients of 2^f = e^(f ln 2), highest degree first (degree 6: error < 2e-7 on |f| <= 1/2).
_EXP2_POLY = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(6, -1, -1))

# The scores one attention chunk may hold (float32 bytes): heads, then query rows, are split to stay
# within it. Small enough for the softmax's passes to run in the CPU's cache (24 heads x 4608 tokens, a
# 1024x1024 step: 2.8 s with 16 MiB chunks, 9.9 s with 256 MiB; no difference at 512 or 1536 tokens), and
# a 16384-token VAE attention or a Kontext step never materialises every score at once.
SCORES_BYTES = 16 * 2**20


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    """e^x for float32 x (the functions below compute in float32 for any input), in operations that
    MLX's compiler fuses: call it inside an `mx.compile`d function (uncompiled it is 10 passes over
    memory)."""
    t = mx.clip(x * _LOG2E, -127.0, 128.0)  # 2^-127 has exponent bits 0 (zero), 2^128 all ones (inf)
    n = mx.round(t)
    f = t - n
    poly = _EXP2_POLY[0]
    for c in _EXP2_POLY[1:]:
        poly = poly * f + c
    # 2^n: n + 127 in the exponent field. n is piecewise constant, so the gradient flows through the
    # polynomial alone: poly'(f) log2(e) 2^n, which is e^x within a few ulp (tested).
    two_n = mx.stop_gradient(mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32))
    return poly * two_n


_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


@mx.compile
def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation: 0.5 x (1 + tanh(z)) = x sigmoid(2z) = x / (1 + e^(-2z)),
    z = sqrt(2/pi) (x + 0.044715 x^3). At large negative x this form keeps the tiny true value (or -0
    once e^(-2z) is inf) where the tanh form cancels 1 + tanh(z) to 0."""
    y = x.astype(mx.float32)
    return (y / (1 + exp(-y * (_GELU_C1 + _GELU_C3 * (y * y))))).astype(x.dtype)


@mx.compile
def silu(x: mx.array) -> mx.array:
    y = x.astype(mx.float32)
    return (y / (1 + exp(-y))).astype(x.dtype)


@mx.compile
def scale_shift_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """silu(x * scale + shift) in one pass (a GroupNorm's affine step followed by its SiLU), in float32."""
    y = x.astype(mx.float32) * scale + shift
    return y / (1 + exp(-y))


@mx.compile
def _exp_minus(x: mx.array, m: mx.array) -> mx.array:
    return exp(x - m)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32."""
    x = x.astype(mx.float32)
    e = _exp_minus(x, mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e * mx.reciprocal(e.sum(axis=-1, keepdims=True))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None,
              scores_bytes: int = SCORES_BYTES) -> mx.array:
    """softmax(scale q k^T + mask) v, as `mx.fast.scaled_dot_product_attention` computes it on the CPU
    (its CPU path is these matrix products around MLX's softmax), with `softmax` above.

    q: (B, H, S, d), k: (B, H, T, d), v: (B, H, T, e) -> (B, H, S, e). mask: None or an additive float
    array broadcastable to (B, H, S, T). Heads, then query rows, are taken in chunks whose float32
    scores fit `scores_bytes`."""
    B, H, S, _ = q.shape
    T = k.shape[2]
    row_bytes = B * T * 4
    heads = max(1, min(H, scores_bytes // (row_bytes * S)))
    rows = S if heads > 1 else max(1, min(S, scores_bytes // row_bytes))
    kt = k.swapaxes(-1, -2)
    outs = []
    for h in range(0, H, heads):
        parts = []
        for r in range(0, S, rows):
            scores = (q[:, h : h + heads, r : r + rows] * scale) @ kt[:, h : h + heads]
            if mask is not None:
                scores = scores + _mask_chunk(mask, h, heads, r, rows)
            parts.append(softmax(scores).astype(v.dtype) @ v[:, h : h + heads])
        outs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None) -> mx.array:
    """Scaled dot-product attention as the models call it: `attention` on the CPU, MLX's fused kernel
    elsewhere. mask: as `mx.fast.scaled_dot_product_attention` takes it (additive arrays on the CPU)."""
    if on_cpu():
        return attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def gelu(x: mx.array) -> mx.array:
    """The tanh-approximated GELU as the models call it: `gelu_tanh` on the CPU, MLX's `gelu_approx`
    elsewhere."""
    return gelu_tanh(x) if on_cpu() else nn.gelu_approx(x)


def _mask_chunk(mask: mx.array, h: int, heads: int, r: int, rows: int) -> mx.array:
    """The part of a (.., H or 1, S or 1, T) mask that a chunk of heads and query rows sees."""
    if mask.ndim == 4:
        mask = mask[:, h : h + heads] if mask.shape[1] > 1 else mask
    if mask.ndim >= 2 and mask.shape[-2] > 1:
        mask = mask[..., r : r + rows, :]
    return mask
