"""The CPU form of FLUX's tanh-GELU, x * sigmoid(2z), is the same function as 0.5 x (1 + tanh(z))."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flux_1.models.transformer import GELUTanh, _gelu_tanh_as_sigmoid, gelu_tanh, mlp


def _tanh_form_f64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _inputs() -> np.ndarray:
    grid = np.linspace(-60, 60, 120_001)
    logs = np.logspace(-30, 30, 4_001)
    return np.concatenate([grid, logs, -logs, [0.0, -0.0]]).astype(np.float32)


def test_sigmoid_form_matches_the_tanh_form_within_float32_rounding():
    x = _inputs()
    exact = _tanh_form_f64(x)
    with mx.stream(mx.cpu):
        ours = np.array(_gelu_tanh_as_sigmoid(mx.array(x))).astype(np.float64)
        mlx_tanh = np.array(nn.gelu_approx(mx.array(x))).astype(np.float64)
    assert np.isfinite(ours).all()
    err = np.abs(ours - exact)
    # Relative: a few float32 ulps times the conditioning |2z| of sigmoid at negative x; where |2z| <= 1
    # (|x| <~ 0.6) and for positive x the bound is ~1e-6.
    u = np.abs(2 * np.sqrt(2 / np.pi) * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3))
    big = np.abs(exact) > 1e-6  # below, MLX's CPU exp is only approximate at large arguments: checked in abs
    assert err[~big].max() <= 1e-7
    assert (err[big] / np.abs(exact[big]) <= 1e-6 * np.maximum(1.0, u[big])).all()
    pos = (x > 0) & (x < 1e15)
    assert (err[pos] / exact[pos] <= 1e-6).all()
    # Never worse in absolute terms than MLX's own tanh form (which cancels 1 + tanh(z) at negative x).
    fin = np.isfinite(mlx_tanh) & (np.abs(x) < 1e12)
    assert err[fin].max() <= np.abs(mlx_tanh - exact)[fin].max() + 1e-7


def test_large_magnitudes_saturate_like_the_tanh_form():
    with mx.stream(mx.cpu):
        y = _gelu_tanh_as_sigmoid(mx.array([-1e30, -1e4, -100.0, 100.0, 1e4, 1e30], dtype=mx.float32))
    np.testing.assert_array_equal(np.array(y), np.array([0, 0, 0, 100, 1e4, 1e30], dtype=np.float32))


def test_dispatch_and_layer_agree_with_mlx_gelu_approx():
    x = mx.random.normal((3, 7, 64), key=mx.random.key(1)) * 4
    ref = nn.gelu_approx(x)
    np.testing.assert_allclose(np.array(gelu_tanh(x)), np.array(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(GELUTanh()(x)), np.array(ref), rtol=1e-5, atol=1e-6)


def test_mlp_keeps_the_checkpoint_layout():
    m = mlp(8, 16)
    names = sorted(k for k, _ in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(m.parameters()))
    assert names == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]
