"""Quantization: the settings, the layer policy, per-layer and image error bounds, quantize-while-loading
memory, and the size table of the real FLUX.1 models (shapes only)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1 import Config, Flux1
from flux_1 import quantization as q
from flux_1.components import COMPONENTS
from flux_1.loading import folder

# Relative output error ||Wq x - W x|| / ||W x|| of every quantized layer of the tiny models (Gaussian
# weights, 16 random inputs). Measured maxima (mlx 0.32.4, CPU): 3-bit 0.200, 4-bit 0.098, 5-bit 0.050,
# 6-bit 0.024, 8-bit 0.0058, mxfp8 0.030, mxfp4 0.133, nvfp4 0.105 (means 0.185 / 0.089 / 0.043 / 0.021 /
# 0.0052 / 0.027 / 0.116 / 0.095). Bounds leave ~20% headroom.
LAYER_ERROR_BOUND = {"3": 0.25, "4": 0.12, "5": 0.06, "6": 0.03, "8": 0.01,
                     "mxfp8": 0.04, "mxfp4": 0.16, "nvfp4": 0.13}
# Mean absolute pixel difference (0-255) of the tiny pipeline's 32x32 image (2 steps, seed 5) against its
# float32 image. Measured: 8-bit 0.14, 6-bit 0.49, 5-bit 1.13, 4-bit 1.79, 3-bit 3.69, mxfp8 0.52,
# mxfp4 2.84, nvfp4 2.21 (another seed and prompt, 64x64 / 4 steps: 0.12, 0.77, 1.24, 1.81, 5.75, 0.63,
# 3.73, 2.13). Bounds: about twice the larger of the two.
IMAGE_MAD_BOUND = {"8": 0.5, "6": 1.6, "5": 2.5, "4": 3.6, "3": 11.0,
                   "mxfp8": 1.3, "mxfp4": 7.0, "nvfp4": 4.5}
QUANTIZED_COMPONENTS = ("transformer", "t5", "clip")


# -- settings ------------------------------------------------------------------------------------------


def test_parse_settings():
    assert q.parse(None) is None and q.parse("none") is None
    assert q.parse(4) == q.parse("4") == q.QuantSpec(bits=4, group_size=64, mode="affine")
    assert q.parse("mxfp4") == q.QuantSpec(bits=4, group_size=32, mode="mxfp4")
    assert q.parse("nvfp4").group_size == 16 and q.parse("mxfp8").bits == 8
    for bad in (2, 7, "16", "fp8", "int4"):
        with pytest.raises(ValueError, match="quantize must be one of"):
            q.parse(bad)
    with pytest.raises(ValueError):
        q.QuantSpec(bits=4, mode="mxfp4")  # mxfp4 has group 32
    with pytest.raises(ValueError):
        q.QuantSpec(bits=4, group_size=48)
    assert q.CHOICES == ("3", "4", "5", "6", "8", "mxfp4", "mxfp8", "nvfp4")


def test_modes_run_on_this_backend():
    # On the CPU backend of mlx 0.32 all three microscaling formats run (quantize, matmul, dequantize).
    modes = q.supported_modes()
    assert "affine" in modes
    if mx.default_device() == mx.cpu:
        assert set(modes) == {"affine", "mxfp4", "mxfp8", "nvfp4"}


def test_group_size_fallback():
    spec = q.QuantSpec(bits=4)
    assert spec.group_for(3072) == 64 and spec.group_for(4096) == 64
    assert spec.group_for(96) == 32  # 64 and 128 do not divide: the largest that does
    assert spec.group_for(48) is None  # nothing divides: the layer stays full precision
    assert q.QuantSpec(bits=4, group_size=128).group_for(192) == 64
    assert q.parse("mxfp4").group_for(48) is None and q.parse("nvfp4").group_for(48) == 16


# -- policy ----------------------------------------------------------------------------------------------


def full_size_model(component: str, guidance: bool = False) -> nn.Module:
    """The real FLUX.1 architecture (default params), never evaluated: shapes only."""
    facts = COMPONENTS[component]
    return facts.model(facts.params(guidance_embed=True) if guidance else facts.params())


def test_policy_on_full_size_models():
    """Which layers of the real FLUX.1 models are quantized (built lazily from default params)."""
    spec = q.QuantSpec(bits=4)
    expected_counts = {"transformer": 19 * 10 + 38 * 3 + 2 + 2 + 1 + 1, "t5": 1 + 24 * 7, "clip": 1 + 12 * 6,
                       "vae": 0}
    for component, count in expected_counts.items():
        model = full_size_model(component)
        plan = q.layer_plan(model, component, spec)
        assert len(plan) == count, component
        modules = dict(model.named_modules())
        for name, how in plan.items():
            assert isinstance(modules[name], (nn.Linear, nn.Embedding))
            assert how == {"group_size": 64, "bits": 4, "mode": "affine"}
        kept = {n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))} - set(plan)
        assert kept == set(COMPONENTS[component].keep_full_precision) or component == "vae", (component, kept)
    transformer = q.layer_plan(full_size_model("transformer", guidance=True), "transformer", spec)
    assert "guidance_in.in_layer" in transformer and "img_in" not in transformer
    assert "final_layer.linear" not in transformer and "final_layer.adaLN_modulation.layers.1" in transformer


def test_quantize_skeleton_rejects_foreign_plan():
    model = full_size_model("clip")
    with pytest.raises(ValueError, match="not linears or embeddings"):
        q.quantize_skeleton(model, {"encoder.layers.0.layer_norm1": {"group_size": 64, "bits": 4}})


def test_plan_spec():
    assert q.plan_spec({}) is None
    plan = {"a": {"group_size": 64, "bits": 4, "mode": "affine"},
            "b": {"group_size": 32, "bits": 4, "mode": "affine"},
            "c": {"group_size": 64, "bits": 4, "mode": "affine"}}
    assert q.plan_spec(plan) == q.QuantSpec(bits=4, group_size=64)
    with pytest.raises(ValueError, match="more than one way"):
        q.plan_spec({**plan, "d": {"group_size": 64, "bits": 8, "mode": "affine"}})


# -- error bounds ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_precision_models(tiny_schnell):
    return {c: folder.load_folder_component(tiny_schnell, c, mx.float32) for c in QUANTIZED_COMPONENTS}


def _layer_errors(root, spec, full) -> dict[str, float]:
    key = mx.random.key(1)
    errors = {}
    for component in QUANTIZED_COMPONENTS:
        quantized = folder.load_folder_component(root, component, mx.float32, spec)
        reference = dict(full[component].named_modules())
        plan = q.describe(quantized)
        assert plan == q.layer_plan(full[component], component, spec)
        for name, m in quantized.named_modules():
            if not isinstance(m, q.QUANTIZED):
                continue
            f = reference[name]
            if isinstance(m, nn.QuantizedLinear):
                x = mx.random.normal((16, f.weight.shape[1]), key=key)
                a, b = m(x), f(x)
                if "bias" in f:
                    a, b = a - f.bias, b - f.bias
            else:
                ids = mx.arange(f.weight.shape[0])
                a, b = m(ids), f(ids)
            errors[f"{component}:{name}"] = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
    return errors


def test_each_quantized_layer_error_is_bounded_and_monotone(tiny_schnell, full_precision_models):
    means = {}
    for label in q.CHOICES:
        errors = _layer_errors(tiny_schnell, q.parse(label), full_precision_models)
        assert len(errors) == 60
        worst = max(errors, key=errors.get)
        assert errors[worst] < LAYER_ERROR_BOUND[label], (label, worst, errors[worst])
        means[label] = float(np.mean(list(errors.values())))
    affine = [means[b] for b in ("3", "4", "5", "6", "8")]
    assert affine == sorted(affine, reverse=True), means  # more bits, less error
    for a, b in zip(affine, affine[1:], strict=False):
        assert b < 0.7 * a, means  # each step is a real improvement (about 2x per bit)
    assert means["mxfp8"] < means["nvfp4"] < means["mxfp4"], means


def test_random_linears_error(tmp_path):
    """Bigger random layers than the tiny models, including a 96-wide input (group 32)."""
    for out_f, in_f in ((512, 1024), (256, 96)):
        w = mx.random.normal((out_f, in_f), key=mx.random.key(3)) / math.sqrt(in_f)
        x = mx.random.normal((32, in_f), key=mx.random.key(4))
        linear = nn.Linear(in_f, out_f, bias=False)
        linear.weight = w
        for label in q.CHOICES:
            spec = q.parse(label)
            group = spec.group_for(in_f)
            if group is None:
                continue
            ql = linear.to_quantized(group_size=group, bits=spec.bits, mode=spec.mode)
            err = float(mx.linalg.norm(ql(x) - linear(x)) / mx.linalg.norm(linear(x)))
            assert err < LAYER_ERROR_BOUND[label], (label, out_f, in_f, err)


@pytest.fixture(scope="module")
def float32_image(tiny_schnell):
    return _image(tiny_schnell, None)


def _image(root, quantize) -> np.ndarray:
    flux = Flux1.from_alias("schnell", path=root, quantize=quantize, precision="float32")
    config = Config(num_inference_steps=2, height=32, width=32)
    image = flux.generate_image(5, "a photograph of a cat", config, progress=False)
    return np.asarray(image.image).astype(np.float64)


@pytest.mark.parametrize("label", q.CHOICES)
def test_tiny_pipeline_image_stays_close(tiny_schnell, float32_image, label):
    image = _image(tiny_schnell, label)
    mad = float(np.abs(image - float32_image).mean())
    print(f"\n{label}: mean |diff| vs float32 = {mad:.3f} / 255")
    assert mad < IMAGE_MAD_BOUND[label], (label, mad)
    if label == "8":
        assert mad < 2.0


# -- quantize while loading ------------------------------------------------------------------------------


def test_quantize_loaded_equals_quantize_while_loading(tiny_schnell):
    """Quantizing a loaded full-precision model (save.py with LoRAs) gives the codes of loading quantized."""
    spec = q.QuantSpec(bits=5)
    for component in QUANTIZED_COMPONENTS:
        loaded = folder.load_folder_component(tiny_schnell, component, mx.float32, spec)
        model = folder.load_folder_component(tiny_schnell, component, mx.float32)
        q.quantize_loaded(model, q.layer_plan(model, component, spec))
        assert q.describe(model) == q.describe(loaded)
        a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.parameters()))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), (component, k)


def _write_synthetic_transformer(root, params) -> dict[str, int]:
    """A transformer-shaped BFL single file (our names load through the BFL table unchanged)."""
    from flux_1.models.transformer import FluxTransformer

    shapes = {k: v.shape for k, v in tree_flatten(FluxTransformer(params).parameters())}
    block = mx.random.normal((1 << 16,), key=mx.random.key(0)) * 0.02  # cheap: tile one random block
    tensors = {}
    for i, (k, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        reps = -(-n // block.size)
        tensors[k] = mx.roll(mx.tile(block, (reps,))[:n], i).reshape(shape)
    mx.save_safetensors(str(root / "flux1-schnell.safetensors"), tensors)
    return {k: v.nbytes for k, v in tensors.items()}


def test_peak_memory_while_loading(tmp_path):
    """Loading -q 4 never holds the full-precision model: peak < quantized + largest layer + slack;
    a full-precision load peaks at the model itself (no second copy)."""
    from flux_1.models.transformer import FluxParams

    params = FluxParams(hidden_size=768, num_heads=6, mlp_hidden=3072, depth=1, depth_single=2,
                        context_dim=1024, vec_dim=256)
    sizes = _write_synthetic_transformer(tmp_path, params)
    total, largest = sum(sizes.values()), max(sizes.values())
    assert 120e6 < total < 200e6 and largest > 15e6  # float32: ~170 MB on disk, linear1 is 16.5 MB
    slack = 2 * 2**20

    def load(spec):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = folder.load_folder_component(tmp_path, "transformer", mx.float32, spec)
        return model, mx.get_peak_memory() - base

    model, peak = load(q.QuantSpec(bits=4))
    quantized = q.parameter_bytes(model)
    print(f"\n-q 4: model {quantized / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB, "
          f"largest layer {largest / 1e6:.1f} MB, full precision {total / 1e6:.1f} MB")
    assert quantized < total / 5
    assert peak < quantized + largest + slack
    del model

    model, peak = load(None)
    print(f"full precision: model {total / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB")
    assert q.parameter_bytes(model) == total
    assert peak < total + largest + slack

    # Quantizing the loaded model (save.py with LoRAs) frees each full-precision layer as it goes.
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory() - total
    q.quantize_loaded(model, q.layer_plan(model, "transformer", q.QuantSpec(bits=4)))
    mx.clear_cache()
    assert mx.get_peak_memory() - base < total + largest + slack
    assert mx.get_active_memory() - base < quantized + slack
    del model
    mx.clear_cache()


@pytest.mark.parametrize("mode,bits", [("affine", 4), ("affine", 8), ("mxfp4", 4), ("nvfp4", 4), ("mxfp8", 8)])
def test_cpu_dequantize_path_equals_the_fused_kernel(mode, bits):
    """Our QuantizedLinear (dequantize + float GEMM on the CPU backend) computes what MLX's fused
    quantized_matmul computes, for every mode, with and without bias."""
    from flux_1.quantization import QuantizedLinear, to_quantized

    spec = q.QuantSpec.from_mode(mode) if mode != "affine" else q.QuantSpec(bits=bits)
    linear = nn.Linear(256, 96, bias=True)
    layer = to_quantized(linear, {"group_size": spec.group_size, "bits": bits, "mode": mode})
    assert isinstance(layer, QuantizedLinear)
    x = mx.random.normal((3, 7, 256), key=mx.random.key(1))
    ours = layer(x)
    fused = nn.QuantizedLinear.__call__(layer, x)
    np.testing.assert_allclose(np.array(ours), np.array(fused), rtol=1e-4, atol=1e-4)


# -- the CPU path: fused kernel for few rows, dequantize + GEMM above, optional dequantized cache -------------


def _quantized_layer(in_features=256, out_features=96, bits=4, seed=0):
    linear = nn.Linear(in_features, out_features)
    linear.update({"weight": mx.random.normal((out_features, in_features), key=mx.random.key(seed)) * 0.1})
    return q.to_quantized(linear, {"group_size": 64, "bits": bits, "mode": "affine"})


@pytest.fixture
def no_dequantized_cache():
    q.set_dequantized_cache(0)
    yield
    q.set_dequantized_cache(0)


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_path_choice_by_rows(monkeypatch, no_dequantized_cache, bits):
    """Up to FUSED_MAX_ROWS rows the fused kernel runs; above, 4-bit codes go through planar_matmul (from
    one row: it beats the fused kernel there) and other widths are dequantized."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU path only")
    layer = _quantized_layer(bits=bits)
    calls = []
    for name in ("dequantize", "planar_matmul"):
        real = getattr(q, name)
        monkeypatch.setattr(q, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    monkeypatch.setattr(nn.QuantizedLinear, "__call__",
                        lambda self, x, real=nn.QuantizedLinear.__call__: calls.append("fused") or real(self, x))
    few = q.FUSED_MAX_ROWS[("affine", bits)]
    assert few == 0  # both beat the fused kernel from one row (quantized_rows in bench/cpu_speed.py)
    if few:
        mx.eval(layer(mx.ones((1, few, 256))))
        assert calls == ["fused"]
        calls.clear()
    mx.eval(layer(mx.ones((1, few + 1, 256))))
    assert calls == ["planar_matmul" if bits == 4 else "dequantize"]
    calls.clear()
    q.set_dequantized_cache(2**20)  # room for a float copy: dequantized (and kept) instead of planes
    mx.eval(layer(mx.ones((1, few + 1, 256))))
    assert calls == ["dequantize"] and layer._dequantized is not None
    q.drop_dequantized(layer)


def test_fused_max_rows_covers_every_setting():
    settings = {(m, b) for m in ("mxfp4", "nvfp4", "mxfp8") for b in [q.MODE_BITS[m]]}
    settings |= {("affine", b) for b in q.AFFINE_BITS}
    assert set(q.FUSED_MAX_ROWS) == settings


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape,group", [((96, 256), 64), ((3, 128), 32), ((40, 512), 128), ((24, 192), 64)])
def test_planar_matmul_is_the_dense_product(shape, group, dtype):
    """x @ W.T and x @ W of the dequantized 4-bit weight, for every group size, leading batch axes and
    the input's dtype, with the gradient w.r.t. x (QLoRA's frozen base runs both directions)."""
    out_f, in_f = shape
    w, scales, biases = mx.quantize(mx.random.normal(shape, key=mx.random.key(7)) * 0.2, group_size=group, bits=4)
    dense = mx.dequantize(w, scales, biases, group_size=group, bits=4)
    x = mx.random.normal((2, 5, in_f), key=mx.random.key(8)).astype(dtype)
    cot = mx.random.normal((2, 5, out_f), key=mx.random.key(9)).astype(dtype)
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    forward = q.planar_matmul(x, w, scales, biases, group, 4)
    assert forward.shape == (2, 5, out_f) and forward.dtype == dtype
    np.testing.assert_allclose(np.array(forward.astype(mx.float32)),
                               np.array((x @ dense.astype(dtype).T).astype(mx.float32)), rtol=tol, atol=tol)
    backward = q.planar_matmul(cot, w, scales, biases, group, 4, transpose=False)
    assert backward.shape == (2, 5, in_f) and backward.dtype == dtype
    np.testing.assert_allclose(np.array(backward.astype(mx.float32)),
                               np.array((cot @ dense.astype(dtype)).astype(mx.float32)), rtol=tol, atol=tol)
    if dtype == mx.float32:
        grad = mx.grad(lambda x: (q.planar_matmul(x, w, scales, biases, group, 4) * cot).sum())(x)
        np.testing.assert_allclose(np.array(grad), np.array(cot @ dense), rtol=1e-5, atol=1e-5)


def test_planar_matmul_takes_4_bit_affine_codes_only():
    w4, s4, b4 = mx.quantize(mx.ones((8, 64)), bits=4)
    assert q.planar(w4, 4, "affine", b4)
    w8, s8, b8 = mx.quantize(mx.ones((8, 64)), bits=8)
    assert not q.planar(w8, 8, "affine", b8)
    wf, sf, *rest = mx.quantize(mx.ones((8, 64)), mode="mxfp4")
    assert not q.planar(wf, 4, "mxfp4", None)


def test_cpu_paths_agree_and_differentiate(no_dequantized_cache):
    """Fused (1 row), dequantize + GEMM and cached weight give the dense product of the dequantized weight,
    and the same gradient w.r.t. the input (a trainer's frozen quantized base)."""
    layer = _quantized_layer()
    dense = mx.dequantize(layer["weight"], layer["scales"], layer["biases"], group_size=64, bits=4)

    def reference(x):
        return x @ dense.T + layer["bias"]

    for rows in (1, 9):
        x = mx.random.normal((rows, 256), key=mx.random.key(rows))
        for budget in (0, 2**20):
            q.set_dequantized_cache(budget)
            for _ in range(2):  # the second call uses the cached weight where there is one
                np.testing.assert_allclose(np.array(layer(x)), np.array(reference(x)), rtol=1e-5, atol=1e-5)
                grad = mx.grad(lambda x: (layer(x) ** 2).sum())(x)
                want = mx.grad(lambda x: (reference(x) ** 2).sum())(x)
                np.testing.assert_allclose(np.array(grad), np.array(want), rtol=1e-4, atol=1e-4)
            q.drop_dequantized(layer)


def test_dequantized_cache_stays_within_budget(no_dequantized_cache):
    import gc

    a, b = _quantized_layer(seed=1), _quantized_layer(seed=2)
    x = mx.ones((8, 256))
    one_layer = 96 * 256 * 4  # float32
    mx.eval(a(x), b(x))
    assert q.dequantized_cache_bytes() == 0  # the default: -q's memory promise holds, nothing cached
    q.set_dequantized_cache(one_layer + 100)  # room for one float copy, not two
    first_a, first_b = a(x), b(x)
    assert q.dequantized_cache_bytes() == one_layer
    assert a._dequantized is not None and getattr(b, "_dequantized", None) is None  # b: planar_matmul
    np.testing.assert_array_equal(np.array(a(x)), np.array(first_a))  # the cached copy, the same numbers
    np.testing.assert_array_equal(np.array(b(x)), np.array(first_b))
    # New codes (a reload, a LoRA fuse) invalidate the copy: the output follows the new weight.
    a.update({"weight": b["weight"], "scales": b["scales"], "biases": b["biases"], "bias": b["bias"]})
    np.testing.assert_allclose(np.array(a(x)), np.array(first_b), rtol=1e-6, atol=1e-6)
    q.drop_dequantized(a)
    gc.collect()
    assert q.dequantized_cache_bytes() == 0
    with pytest.raises(ValueError, match="cache limit must be >= 0"):
        q.set_dequantized_cache(-1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group", [((96, 256), 64), ((3, 128), 32), ((40, 512), 128)])
def test_cpu_dequantize_equals_mlx_dequantize(bits, shape, group):
    """The compiled CPU unpacking of affine 4/8-bit codes is bitwise MLX's dequantize for float32 scales."""
    w, scales, biases = mx.quantize(mx.random.normal(shape, key=mx.random.key(bits)) * 0.2, group_size=group,
                                    bits=bits)
    ours = q.dequantize(w, scales, biases, group, bits)
    assert mx.array_equal(ours, mx.dequantize(w, scales, biases, group_size=group, bits=bits))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_cpu_dequantize_rounds_once_for_half_precision_scales(dtype):
    w, scales, biases = mx.quantize(mx.random.normal((64, 256), key=mx.random.key(3)).astype(dtype), bits=4)
    ours = q.dequantize(w, scales, biases, 64, 4)
    theirs = mx.dequantize(w, scales, biases, group_size=64, bits=4)
    assert ours.dtype == theirs.dtype == dtype
    exact = q.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), 64, 4)
    ours_err = mx.abs(ours.astype(mx.float32) - exact).max().item()
    assert ours_err <= mx.abs(theirs.astype(mx.float32) - exact).max().item()
    # one rounding: within half an ulp of the dtype at the weights' largest magnitude
    mantissa_bits = 7 if dtype == mx.bfloat16 else 10
    ulp = 2.0 ** (math.floor(math.log2(mx.abs(exact).max().item())) - mantissa_bits)
    assert ours_err <= 0.5 * ulp


@pytest.mark.parametrize("bits", [2, 3, 6])
def test_cpu_dequantize_leaves_other_widths_to_mlx(bits):
    w, scales, biases = mx.quantize(mx.random.normal((32, 128), key=mx.random.key(5)), bits=bits)
    assert mx.array_equal(q.dequantize(w, scales, biases, 64, bits),
                          mx.dequantize(w, scales, biases, group_size=64, bits=bits))
