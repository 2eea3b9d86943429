"""cpu_math: the fast exp and what is built on it equal the exact functions within float32 rounding (and
MLX's own ops within their tolerance), at the edges too; chunked attention equals MLX's SDPA."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from flux_1.models import cpu_math
from flux_1.models.transformer import GELUTanh, gelu_tanh, mlp

fast_exp = mx.compile(cpu_math.exp)


def _grid() -> np.ndarray:
    grid = np.linspace(-87, 88, 350_001)
    logs = np.logspace(-30, 1.9, 4_001)
    return np.concatenate([grid, logs, -logs, [0.0, -0.0]]).astype(np.float32)


def test_exp_relative_error_is_that_of_mlx_exp():
    x = _grid()
    exact = np.exp(x.astype(np.float64))
    ours = np.array(fast_exp(mx.array(x))).astype(np.float64)
    mlx_exp = np.array(mx.exp(mx.array(x))).astype(np.float64)
    normal = exact > 1.2e-38
    ours_err = (np.abs(ours - exact) / exact)[normal].max()
    assert ours_err < 5e-6
    assert ours_err <= 1.5 * (np.abs(mlx_exp - exact) / exact)[normal].max()


def test_exp_edges_match_mlx_exp():
    x = mx.array([-1e30, -200.0, -88.5, 88.5, 89.0, 1e30, np.inf, -np.inf, np.nan], dtype=mx.float32)
    ours, theirs = np.array(fast_exp(x)), np.array(mx.exp(x))
    np.testing.assert_array_equal(ours, theirs)  # 0, inf, NaN where MLX's exp gives them
    assert np.isnan(ours[-1]) and np.isinf(ours[3]) and ours[2] == 0


def test_exp_gradient_is_exp():
    x = mx.array(np.linspace(-20, 20, 4001).astype(np.float32))
    grad = np.array(mx.grad(lambda a: fast_exp(a).sum())(x)).astype(np.float64)
    exact = np.exp(np.array(x).astype(np.float64))
    assert (np.abs(grad - exact) / exact).max() < 2e-5


@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
def test_activation_gradients_match_mlx(name):
    """The activations' gradients (a LoRA trainer differentiates through the MLP's GELU) flow through
    exp2_parts' custom VJP: equal to MLX's own forms' within float32 rounding."""
    ours, theirs = getattr(cpu_math, name), {"gelu_tanh": nn.gelu_approx, "silu": nn.silu}[name]
    x = mx.array(np.linspace(-12, 12, 2401).astype(np.float32))
    cot = mx.random.normal(x.shape, key=mx.random.key(7))
    got = mx.grad(lambda a: (ours(a) * cot).sum())(x)
    want = mx.grad(lambda a: (theirs(a) * cot).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-6)
    scale, shift = mx.array([1.5]), mx.array([-0.25])
    got = mx.grad(lambda a: (cpu_math.scale_shift_silu(a, scale, shift) * cot).sum())(x)
    want = mx.grad(lambda a: (nn.silu(a * scale + shift) * cot).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-6)


def _gelu_tanh_f64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_gelu_tanh_matches_the_tanh_form_within_float32_rounding():
    grid = np.linspace(-60, 60, 120_001)
    logs = np.logspace(-30, 30, 4_001)
    x = np.concatenate([grid, logs, -logs, [0.0, -0.0]]).astype(np.float32)
    exact = _gelu_tanh_f64(x)
    ours = np.array(cpu_math.gelu_tanh(mx.array(x))).astype(np.float64)
    mlx_tanh = np.array(nn.gelu_approx(mx.array(x))).astype(np.float64)
    assert np.isfinite(ours).all()
    err = np.abs(ours - exact)
    # Relative: a few ulps times sigmoid's conditioning |2z| at negative x; positive x: ~1e-6.
    u = np.abs(2 * np.sqrt(2 / np.pi) * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3))
    big = np.abs(exact) > 1e-6
    assert err[~big].max() <= 1e-7
    assert (err[big] / np.abs(exact[big]) <= 4e-6 * np.maximum(1.0, u[big])).all()
    pos = (x > 0) & (x < 1e15)
    assert (err[pos] / exact[pos] <= 4e-6).all()
    # Never worse in absolute terms than MLX's own tanh form (which cancels 1 + tanh(z) at negative x).
    fin = np.isfinite(mlx_tanh) & (np.abs(x) < 1e12)
    assert err[fin].max() <= np.abs(mlx_tanh - exact)[fin].max() + 1e-7


def test_gelu_tanh_saturates_like_the_tanh_form():
    y = cpu_math.gelu_tanh(mx.array([-1e30, -1e4, -100.0, 100.0, 1e4, 1e30], dtype=mx.float32))
    np.testing.assert_array_equal(np.array(y), np.array([0, 0, 0, 100, 1e4, 1e30], dtype=np.float32))


def test_silu_forms():
    x = np.concatenate([np.linspace(-100, 100, 20_001), [0.0, -1e30, 1e30]]).astype(np.float32)
    with np.errstate(over="ignore"):
        exact = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    ours = np.array(cpu_math.silu(mx.array(x))).astype(np.float64)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, exact, rtol=4e-6, atol=1e-30)
    scale, shift = mx.array([2.0, -0.5, 1.0]), mx.array([0.25, 1.0, -3.0])
    x = mx.random.normal((4, 5, 3), key=mx.random.key(0)) * 6
    np.testing.assert_allclose(np.array(cpu_math.scale_shift_silu(x, scale, shift)),
                               np.array(nn.silu(x * scale + shift)), rtol=1e-5, atol=1e-6)


def test_softmax_matches_mlx_and_zeroes_masked_entries():
    x = mx.random.normal((3, 7, 50), key=mx.random.key(2)) * 20
    np.testing.assert_allclose(np.array(cpu_math.softmax(x)), np.array(mx.softmax(x, axis=-1, precise=True)),
                               rtol=1e-5, atol=1e-7)
    masked = mx.concatenate([x[..., :10], mx.full((3, 7, 5), -np.inf)], axis=-1)
    p = np.array(cpu_math.softmax(masked))
    assert (p[..., 10:] == 0).all()
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize("scores_bytes", [cpu_math.SCORES_BYTES, 2 * 40 * 33 * 4, 40 * 4 * 3, 1])
@pytest.mark.parametrize("mask_shape", [None, (1, 6, 40, 33), (1, 1, 40, 33), (40, 33), (1, 6, 1, 33)])
def test_attention_equals_mlx_sdpa_in_any_chunking(scores_bytes, mask_shape):
    """One chunk, head groups (2 heads), query-row chunks (3 rows), single rows: the same output."""
    keys = mx.random.split(mx.random.key(3), 4)
    q = mx.random.normal((2, 6, 40, 16), key=keys[0])
    k = mx.random.normal((2, 6, 33, 16), key=keys[1])
    v = mx.random.normal((2, 6, 33, 24), key=keys[2])
    mask = None if mask_shape is None else mx.random.normal(mask_shape, key=keys[3]) * 3
    ours = cpu_math.attention(q, k, v, scale=0.3, mask=mask, scores_bytes=scores_bytes)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert ours.shape == (2, 6, 40, 24)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)


def test_attention_gradient_matches_mlx_sdpa():
    keys = mx.random.split(mx.random.key(4), 3)
    q, k, v = (mx.random.normal((1, 2, 9, 8), key=key) for key in keys)

    def loss(sdpa, q, k, v):
        return (sdpa(q, k, v, scale=0.35) ** 2).sum()

    ours = mx.grad(lambda *a: loss(cpu_math.attention, *a), argnums=(0, 1, 2))(q, k, v)
    theirs = mx.grad(lambda *a: loss(mx.fast.scaled_dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_transformer_gelu_dispatch_and_layer_agree_with_mlx_gelu_approx():
    x = mx.random.normal((3, 7, 64), key=mx.random.key(1)) * 4
    ref = nn.gelu_approx(x)
    np.testing.assert_allclose(np.array(gelu_tanh(x)), np.array(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(GELUTanh()(x)), np.array(ref), rtol=1e-5, atol=1e-6)
    assert mx.array_equal(gelu_tanh(x), cpu_math.gelu_tanh(x))  # the CPU form on this CPU-only machine


def test_mlp_keeps_the_checkpoint_layout():
    from mlx.utils import tree_flatten

    names = sorted(k for k, _ in tree_flatten(mlp(8, 16).parameters()))
    assert names == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]


def test_activations_keep_the_input_dtype_and_compute_in_float32():
    x = (mx.random.normal((4, 64), key=mx.random.key(5)) * 3).astype(mx.bfloat16).astype(mx.float32)
    for fast, reference in ((cpu_math.gelu_tanh, nn.gelu_approx), (cpu_math.silu, nn.silu)):
        half = fast(x.astype(mx.bfloat16))
        assert half.dtype == mx.bfloat16
        # One bfloat16 rounding of the float32 result: within 2^-8 relative.
        np.testing.assert_allclose(np.array(half.astype(mx.float32)), np.array(reference(x)), rtol=2**-8,
                                   atol=1e-6)
