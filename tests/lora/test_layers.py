"""Applying LoRAs: side path vs merge, quantized layers, several LoRAs, strengths and removal."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.lora import LoRA, LoRAError, LoRALinear, LoRAStack, apply_loras, bake

from .common import (
    CTX,
    IN,
    MLP,
    VEC,
    D,
    Rand,
    effective_weight,
    get,
    linear_names,
    tiny_clip,
    tiny_transformer,
)

QKV, L1 = "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"


def kohya_qkv(r: Rand, rank=4, alpha=2.0) -> tuple[LoRA, np.ndarray]:
    down, up = r(rank, D), r(3 * D, rank)
    s = "lora_unet_double_blocks_0_img_attn_qkv"
    t = {f"{s}.lora_down.weight": down, f"{s}.lora_up.weight": up, f"{s}.alpha": np.float32(alpha)}
    return LoRA("kohya", {k: mx.array(v) for k, v in t.items()}), alpha / rank * up @ down


def diffusers_parts(r: Rand) -> tuple[LoRA, dict[str, np.ndarray]]:
    """to_q (rank 2) and to_v (rank 3) onto qkv; proj_mlp onto linear1; a LoKr on to_k."""
    t, want = {}, {QKV: np.zeros((3 * D, D), np.float32), L1: np.zeros((3 * D + MLP, D), np.float32)}
    for module, stem, row, rows, rank in [
        (QKV, "transformer_blocks.0.attn.to_q", 0, D, 2),
        (QKV, "transformer_blocks.0.attn.to_v", 2 * D, D, 3),
        (L1, "single_transformer_blocks.0.proj_mlp", 3 * D, MLP, 2),
    ]:
        a, b = r(rank, D), r(rows, rank)
        t[f"transformer.{stem}.lora_A.weight"], t[f"transformer.{stem}.lora_B.weight"] = a, b
        want[module][row : row + rows] += b @ a
    w1, w2 = r(4, 4), r(8, 8)
    k = "transformer.transformer_blocks.0.attn.to_k"
    t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2"] = w1, w2
    want[QKV][D : 2 * D] += np.kron(w1, w2)
    return LoRA("diffusers", {k: mx.array(v) for k, v in t.items()}), want


def quantized_tiny():
    model = tiny_transformer()
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0,
    )
    assert isinstance(get(model, QKV), nn.QuantizedLinear) and isinstance(get(model, "img_in"), nn.Linear)
    return model


def test_side_path_on_quantized_layers_equals_dense_delta():
    model = quantized_tiny()
    r = Rand(1)
    (k, dk), (d, dd) = kohya_qkv(r), diffusers_parts(r)
    base = {m: get(model, m) for m in (QKV, L1)}
    w0 = {m: effective_weight(base[m]) for m in (QKV, L1)}  # the dequantized weights
    stack = apply_loras(model, [k, d], [0.5, 1.25], merge=True)  # merge does not apply to quantized layers
    x = mx.array(Rand(2)(5, D))
    for m, delta in [(QKV, 0.5 * dk + 1.25 * dd[QKV]), (L1, 1.25 * dd[L1])]:
        layer = get(model, m)
        assert isinstance(layer, LoRALinear) and layer.quantized and layer["weight"] is base[m]["weight"]
        np.testing.assert_allclose(effective_weight(layer), w0[m] + delta, atol=1e-5)
        # y = Wq x + delta x, with Wq applied by the quantized kernel
        want = np.array(base[m](x)) + np.array(x) @ delta.T
        np.testing.assert_allclose(np.array(layer(x)), want, rtol=1e-5, atol=1e-5)
    stack.remove(model)
    assert all(get(model, m) is base[m] for m in (QKV, L1))


def test_fused_group_shares_one_down_and_parts_stack():
    model = tiny_transformer()
    r = Rand(3)
    (k, _), (d, _) = kohya_qkv(r, rank=4), diffusers_parts(r)
    stack = LoRAStack()
    stack.add(k, 1.0, model)
    side = get(model, QKV)._side
    assert side.a.shape == (4, D) and side.b.shape == (3 * D, 4)  # A x once for q | k | v
    stack.add(d, 1.0, model)
    side = get(model, QKV)._side
    assert side.a.shape == (4 + 2 + 3, D) and side.b.shape == (3 * D, 9)  # one matmul pair for everything
    b = np.array(side.b)
    assert not b[D:, 4:6].any() and not b[: 2 * D, 6:].any()  # to_q / to_v columns only feed their rows
    assert side.dense.shape == (3 * D, D)  # the LoKr: a dense side weight


@pytest.mark.parametrize("merge", [False, True])
def test_several_loras_add_up_and_strengths_change_without_reload(merge):
    model = tiny_transformer()
    r = Rand(4)
    (k, dk), (d, dd) = kohya_qkv(r), diffusers_parts(r)
    base = get(model, QKV)
    w0 = effective_weight(base)
    stack = LoRAStack(merge)
    stack.add(k, 1.0, model)
    stack.add(d, 1.0, model)
    stack.add(k, -2.0, model)  # the same LoRA twice: a second name
    assert [e["name"] for e in stack.info()] == ["kohya", "diffusers", "kohya#2"]
    np.testing.assert_allclose(effective_weight(get(model, QKV)), w0 - dk + dd[QKV], atol=1e-5)
    for s in (0.3, 3.0, -1.0, 0.3):
        stack.set_strength("diffusers", s, model)
        np.testing.assert_allclose(effective_weight(get(model, QKV)), w0 - dk + s * dd[QKV], atol=1e-5)
    stack.remove(model, name="kohya#2")
    np.testing.assert_allclose(effective_weight(get(model, QKV)), w0 + dk + 0.3 * dd[QKV], atol=1e-5)
    stack.set_merge(not merge, model)
    np.testing.assert_allclose(effective_weight(get(model, QKV)), w0 + dk + 0.3 * dd[QKV], atol=1e-5)
    stack.remove(model)
    assert get(model, QKV) is base and type(base) is nn.Linear
    # both runs went through a merge (set_merge toggles), undone by subtracting the same float32
    # delta: float32 rounding only (test_side_path_removal_... checks the never-merged case)
    np.testing.assert_allclose(effective_weight(base), w0, atol=1e-6)


def test_side_path_removal_restores_the_base_arrays_bit_exactly():
    model = tiny_transformer()
    params = dict(tree_flatten(model.parameters()))
    (k, _), (d, _) = kohya_qkv(Rand(5)), diffusers_parts(Rand(6))
    stack = apply_loras(model, [k, d], clip=None)
    # wrapped layers keep the base parameter names (saving a model sees the base weights)
    assert dict(tree_flatten(model.parameters())).keys() == params.keys()
    stack.set_scales([0.1, 2.0], model)
    stack.remove(model, name="kohya")
    stack.remove(model, name="diffusers")
    assert all(v is params[name] for name, v in tree_flatten(model.parameters()))
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_bf16_merge_round_trip_moves_at_most_one_ulp():
    model = tiny_transformer()
    model.set_dtype(mx.bfloat16)
    w0 = np.array(get(model, QKV).weight.astype(mx.float32))
    k, dk = kohya_qkv(Rand(7))
    stack = LoRAStack(merge=True)
    stack.add(k, 1.0, model)
    for s in (0.5, 2.0, 1.0):
        stack.set_strength("kohya", s, model)
    stack.remove(model)
    w = np.array(get(model, QKV).weight.astype(mx.float32))
    # bf16 keeps 8 significant bits; each merge step rounds W (at most |W0| + 2 |dk| in between) once
    ulp = 2.0 ** (np.floor(np.log2(np.abs(w0) + 2 * np.abs(dk))) - 7)
    assert np.all(np.abs(w - w0) <= 4 * ulp / 2)
    assert np.mean(w != w0) < 0.5  # most elements come back exactly
    assert get(model, QKV).weight.dtype == mx.bfloat16


def test_whole_model_side_path_equals_merged_forward():
    pytest.importorskip("flux_1.models.transformer")
    model = tiny_transformer()
    if not hasattr(model, "params"):
        pytest.skip("stub model")
    r = Rand(8)
    (k, _), (d, _) = kohya_qkv(r), diffusers_parts(r)
    x = dict(img=mx.array(r(1, 4, IN)), txt=mx.array(r(1, 3, CTX)), pooled=mx.array(r(1, VEC)))
    x.update(
        timestep=mx.array([0.5]), img_ids=mx.zeros((4, 3)), txt_ids=mx.zeros((3, 3)), guidance=mx.array([3.5])
    )
    base_out = np.array(model(**x))
    stack = apply_loras(model, [k, d], [0.8, 1.0])
    side = np.array(model(**x))
    stack.set_merge(True, model)
    merged = np.array(model(**x))
    np.testing.assert_allclose(side, merged, rtol=1e-4, atol=1e-5)
    assert np.abs(side - base_out).max() > 1e-3  # the LoRA does something
    stack.remove(model)
    np.testing.assert_allclose(np.array(model(**x)), base_out, atol=1e-6)


def style_lora(r: Rand) -> LoRA:
    """kohya qkv + a CLIP q_proj + a T5 key."""
    t = dict(kohya_qkv(r)[0].tensors)
    t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = mx.array(r(2, 16))
    t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = mx.array(r(16, 2))
    t["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = mx.array(r(2, 16))
    return LoRA("style", t)


def test_pipeline_flow_load_rescale_release_reload_remove(tmp_path):
    from safetensors.numpy import save_file

    model, clip = tiny_transformer(guidance=False), tiny_clip()
    path = tmp_path / "style.safetensors"
    save_file({k: np.array(v) for k, v in style_lora(Rand(9)).tensors.items()}, str(path))
    printed = []
    stack = LoRAStack.load([path], [0.9], model, clip, log=printed.append)
    assert printed == stack.lines() and printed[0].endswith("x 0.9")
    assert printed[0].startswith(
        "LoRA 'style': 1 transformer + 1 clip layers, 5/6 keys matched; skipped 1: 1 T5"
    )
    assert stack.info() == [{"name": "style", "path": str(path), "scale": 0.9}]
    q = "encoder.layers.0.self_attn.q_proj"
    w0 = effective_weight(get(tiny_clip(), q))  # tiny_clip() is seeded: the same base weights
    w = effective_weight(get(clip, q))
    assert isinstance(get(clip, q), LoRALinear) and np.abs(w - w0).max() > 1e-3
    stack.set_scales([1.8], model, None)  # CLIP released: only the transformer is updated now
    fresh = tiny_clip()  # reloaded: no LoRA until the stack is applied to it
    stack.apply_text_encoder(fresh)
    np.testing.assert_allclose(effective_weight(get(fresh, q)) - w0, 2 * (w - w0), atol=1e-5)
    stack.remove(model, fresh)
    assert not stack.entries and not any(isinstance(m, LoRALinear) for _, m in fresh.named_modules())
    with pytest.raises(KeyError, match="no LoRA named 'nope'"):
        stack.remove(model, name="nope")


def test_load_is_all_or_nothing(tmp_path):
    from safetensors.numpy import save_file

    model = tiny_transformer()
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({k: np.array(v) for k, v in kohya_qkv(Rand(11))[0].tensors.items()}, str(good))
    save_file({"lora_unet_img_in.lora_down.weight": Rand(12)(2, D)}, str(bad))  # wrong in-features
    with pytest.raises(LoRAError, match="lora_unet_img_in.lora_down.weight"):
        LoRAStack.load([good, bad], None, model, log=None)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_clip_keys_wait_for_a_clip_model():
    model = tiny_transformer(guidance=False)
    stack = LoRAStack()
    report = stack.add(style_lora(Rand(10)), 1.0, model)  # low-memory pipeline: no CLIP loaded
    assert "2 CLIP keys, pending (applied when the CLIP model is loaded)" in report.line()
    clip = tiny_clip()
    stack.apply_text_encoder(clip)
    assert isinstance(get(clip, "encoder.layers.0.self_attn.q_proj"), LoRALinear)


def test_bake_folds_everything_into_plain_layers():
    model = tiny_transformer()
    r = Rand(13)
    (k, dk), (d, dd) = kohya_qkv(r), diffusers_parts(r)
    b = r(6 * D)
    bias = LoRA("bias", {"diffusion_model.double_blocks.0.img_mod.lin.diff_b": mx.array(b)})
    mod = "double_blocks.0.img_mod.lin"
    w0, b0 = effective_weight(get(model, QKV)), np.array(get(model, mod).bias)
    params = {k for k, _ in tree_flatten(model.parameters())}
    apply_loras(model, [k, d, bias], [1.0, 0.5, 2.0])  # side path
    assert bake(model) == 3
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert {k for k, _ in tree_flatten(model.parameters())} == params
    np.testing.assert_allclose(np.array(get(model, QKV).weight), w0 + dk + 0.5 * dd[QKV], atol=1e-5)
    np.testing.assert_allclose(np.array(get(model, mod).bias), b0 + 2 * b, atol=1e-6)
    quantized = quantized_tiny()
    apply_loras(quantized, [k])
    with pytest.raises(ValueError, match="quantized"):
        bake(quantized)


def test_unwrapped_linears_are_untouched():
    model = tiny_transformer()
    before = {n: get(model, n) for n in linear_names(model)}
    apply_loras(model, [kohya_qkv(Rand(10))[0]])
    changed = [n for n in before if get(model, n) is not before[n]]
    assert changed == [QKV]
