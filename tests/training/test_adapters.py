"""Trainable adapters: which projections, PEFT's init, the exact side path, a frozen base, strict state."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.loading import folder
from flux_1.loading.tables import DIFFUSERS_TRANSFORMER, part_rows, source_names
from flux_1.quantization import QuantSpec, layer_plan, quantize_loaded
from flux_1.training import AdapterConfig, adapter_state, attach, load_adapter_state, loss_and_grad, target_modules
from flux_1.training.adapters import AdaptedLinear, adapted_layers, detach
from tests.lora.common import effective_weight, get, swap, tiny_transformer

from .common import batch, mx_batch, randomize_ups

ATTENTION = [
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
]  # fmt: skip


def test_attention_targets_are_peft_to_q_k_v_out():
    assert target_modules(tiny_transformer(), "attention") == ATTENTION


def test_all_targets_every_block_linear_and_nothing_else():
    names = target_modules(tiny_transformer(), "all")
    assert len(names) == len(set(names)) == 20  # 14 per double block (2 x (q, k, v, out, mlp 0/2, mod)), 6 single
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    for expected in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.ff_context.net.2",
                     "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.norm.linear"):
        assert expected in names


def test_regex_targets_match_in_full():
    t = tiny_transformer()
    assert target_modules(t, r".*\.to_[qkv]") == [n for n in ATTENTION if not n.endswith("to_out.0")]
    assert target_modules(t, "norm_out.linear") == ["norm_out.linear"]


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"), ({"rank": True}, "got True"),
    ({"rank": 2.5}, "got 2.5"), ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
    ({"alpha": float("nan")}, "got nan"), ({"alpha": float("inf")}, "got inf"), ({"targets": ""}, "got ''"),
])  # fmt: skip
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        AdapterConfig(**kwargs)


@pytest.mark.parametrize("targets,message", [
    ("to_q(", "'to_q\\(' is not a valid regex"), ("to_q", "'to_q' match no linear module"),
])  # fmt: skip
def test_bad_targets_are_named(targets, message):
    t = tiny_transformer()
    with pytest.raises(ValueError, match=message):
        attach(t, AdapterConfig(targets=targets))
    assert not adapted_layers(t)


def test_attach_initialises_like_peft_and_freezes_the_rest():
    t = tiny_transformer()
    x = mx.random.normal((1, 3, 32), key=mx.random.key(0))
    before = get(t, "double_blocks.0.img_attn.qkv")(x)
    names = attach(t, AdapterConfig(rank=3, alpha=6.0, targets="all"), seed=7)
    assert names == target_modules(tiny_transformer(), "all")
    trainable = dict(tree_flatten(t.trainable_parameters()))
    assert len(trainable) == 2 * len(names) and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert all(v.dtype == mx.float32 for v in trainable.values())
    layer = get(t, "double_blocks.0.img_attn.qkv")
    assert isinstance(layer, AdaptedLinear) and layer.scale == 2.0
    assert [p.name for p in layer.projections] == [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    a = np.array(layer.lora_A[0])
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std bound/sqrt(3)
    assert a.shape == (3, 32) and np.abs(a).max() <= bound and abs(np.std(a) - bound / math.sqrt(3)) < bound / 6
    assert layer.lora_B[0].shape == (32, 3)
    assert all(not np.any(np.array(v)) for k, v in trainable.items() if ".lora_B." in k)  # B = 0: no change
    assert np.array_equal(np.array(layer(x)), np.array(before))
    again = tiny_transformer()
    attach(again, AdapterConfig(rank=3, alpha=6.0, targets="all"), seed=7)
    other = tiny_transformer()
    attach(other, AdapterConfig(rank=3, alpha=6.0, targets="all"), seed=8)
    k = "double_blocks.0.img_attn.qkv.lora_A.1"
    assert np.array_equal(np.array(adapter_state(again)[k]), np.array(trainable[k]))
    assert not np.array_equal(np.array(adapter_state(other)[k]), np.array(trainable[k]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        attach(t, AdapterConfig())


def expected_delta(module: str, layer: AdaptedLinear) -> np.ndarray:
    """scale * B_p @ A_p in each projection's rows (diffusers order mapped onto ours), zeros elsewhere."""
    out, inp = effective_weight(layer).shape
    names = source_names(DIFFUSERS_TRANSFORMER, module)
    rows = part_rows(module, out, inp, names[0][1].parts)
    delta = np.zeros((out, inp))
    for p, a, b in zip(layer.projections, layer.lora_A, layer.lora_B, strict=True):
        (resolved,) = [r for n, r in names if n == p.name]
        d = np.array(b, np.float64) @ np.array(a, np.float64)
        delta[sum(rows[: resolved.part]) : sum(rows[: resolved.part + 1])] = swap(d) if p.swap_halves else d
    return layer.scale * delta


@pytest.mark.parametrize("targets", ["attention", "all", "norm_out.linear"])
def test_side_path_is_the_per_projection_delta(targets):
    t = tiny_transformer()
    base = {m: effective_weight(get(t, m)) for m, _ in [(n, 0) for n, m in t.named_modules()
                                                       if isinstance(m, nn.Linear)]}
    attach(t, AdapterConfig(rank=2, alpha=5.0, targets=targets))
    randomize_ups(t, std=0.3)
    for module, layer in adapted_layers(t):
        got = effective_weight(layer) - base[module]
        np.testing.assert_allclose(got, expected_delta(module, layer), atol=1e-5, err_msg=module)
        assert np.abs(got).max() > 1e-3


def test_side_path_runs_in_float32_on_a_bfloat16_base():
    t = tiny_transformer()
    t.set_dtype(mx.bfloat16)
    attach(t, AdapterConfig(rank=2, alpha=2.0, targets="attention"))
    randomize_ups(t, std=0.3)
    layer = get(t, "double_blocks.0.img_attn.proj")
    x = mx.random.normal((2, 32), key=mx.random.key(1)).astype(mx.bfloat16)
    y = layer(x)
    assert y.dtype == mx.bfloat16 and layer.lora_A[0].dtype == mx.float32
    base = layer.unwrap()(x).astype(mx.float32)
    side = (x.astype(mx.float32) @ layer.lora_A[0].T) @ layer.lora_B[0].T  # PEFT: x cast to float32
    expected = (base + side).astype(mx.bfloat16)
    assert np.array_equal(np.array(y.astype(mx.float32)), np.array(expected.astype(mx.float32)))


@pytest.fixture(scope="module")
def dev_transformer(tiny_dev):
    return lambda: folder.load_folder_component(tiny_dev, "transformer", mx.float32)


@pytest.mark.parametrize("quantize", [None, 4])
def test_base_never_changes_under_training(dev_transformer, quantize):
    t = dev_transformer()
    if quantize:
        quantize_loaded(t, layer_plan(t, "transformer", QuantSpec(bits=quantize)))
    frozen = {k: np.array(v) for k, v in tree_flatten(t.parameters())}
    attach(t, AdapterConfig(rank=2, targets="all"))
    randomize_ups(t)
    step = loss_and_grad(t)
    opt = optim.AdamW(learning_rate=1e-2, bias_correction=True)
    start = adapter_state(t)
    for seed in range(3):
        loss, grads = step(**mx_batch(batch(t.params, seed)))
        opt.update(t, grads)
        mx.eval(t.parameters(), opt.state)
    assert np.isfinite(loss.item())
    after = {k: np.array(v) for k, v in tree_flatten(t.parameters())}
    assert {k for k in after if ".lora_" not in k} == set(frozen)
    for k, v in frozen.items():
        assert after[k].dtype == v.dtype and np.array_equal(after[k], v), k  # bit for bit
    moved = [k for k, v in adapter_state(t).items() if not np.array_equal(np.array(v), np.array(start[k]))]
    assert len(moved) == len(start)
    detach(t)
    assert not adapted_layers(t) and {k for k, _ in tree_flatten(t.parameters())} == set(frozen)


def test_gradient_checkpointing_changes_nothing(dev_transformer):
    t = dev_transformer()
    attach(t, AdapterConfig(rank=2, targets="all"))
    randomize_ups(t)
    b = mx_batch(batch(t.params))
    loss, grads = loss_and_grad(t)(**b)
    t.grad_checkpoint = True
    loss_ckpt, grads_ckpt = loss_and_grad(t)(**b)
    assert abs(loss.item() - loss_ckpt.item()) <= 1e-6 * abs(loss.item())
    flat, flat_ckpt = dict(tree_flatten(grads)), dict(tree_flatten(grads_ckpt))
    assert flat.keys() == flat_ckpt.keys() and len(flat) > 0
    for k, g in flat.items():
        np.testing.assert_allclose(np.array(flat_ckpt[k]), np.array(g), rtol=1e-5, atol=1e-7, err_msg=k)


def test_adapter_state_round_trip_and_strictness():
    t = tiny_transformer()
    attach(t, AdapterConfig(rank=2, targets="attention"))
    randomize_ups(t)
    state = {k: mx.array(v) for k, v in adapter_state(t).items()}
    fresh = tiny_transformer()
    with pytest.raises(ValueError, match="no LoRA adapters attached"):
        load_adapter_state(fresh, state)
    attach(fresh, AdapterConfig(rank=2, targets="attention"), seed=5)
    load_adapter_state(fresh, state)
    for k, v in adapter_state(fresh).items():
        assert np.array_equal(np.array(v), np.array(state[k]))
    key = "double_blocks.0.img_attn.qkv.lora_B.2"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=f"missing 1 key.*'{key}'"):
        load_adapter_state(fresh, missing)
    with pytest.raises(ValueError, match="unexpected key.*'extra.lora_A.0'"):
        load_adapter_state(fresh, {**state, "extra.lora_A.0": state[key]})
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(32, 3\\), expected \\(32, 2\\)"):
        load_adapter_state(fresh, {**state, key: mx.zeros((32, 3))})


def test_applied_inference_loras_are_refused(tmp_path):
    from flux_1.lora import LoRA, apply_loras

    t = tiny_transformer()
    rng = np.random.default_rng(0)
    lora = LoRA("style", {"double_blocks.0.img_attn.proj.lora_A.weight": mx.array(rng.standard_normal((2, 32))),
                          "double_blocks.0.img_attn.proj.lora_B.weight": mx.array(rng.standard_normal((32, 2)))})
    apply_loras(t, [lora])
    with pytest.raises(ValueError, match="has LoRAs applied: bake them in"):
        attach(t, AdapterConfig())


def test_trains_on_a_saved_4bit_bfloat16_folder():
    """A save.py folder (4-bit, bfloat16): the quantized base stays bit for bit, the factors train in float32."""
    from pathlib import Path

    from flux_1.loading import load_component

    saved = Path(__file__).resolve().parents[1] / "fixtures" / "saved_v1"
    t = load_component(saved, "transformer", mx.bfloat16)
    assert any("scales" in m for _, m in t.named_modules())
    raw = lambda v: np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)  # noqa: E731  (the bits)
    frozen = {k: raw(v) for k, v in tree_flatten(t.parameters())}
    attach(t, AdapterConfig(rank=2, targets="all"))
    randomize_ups(t)
    opt = optim.AdamW(learning_rate=1e-3, bias_correction=True)
    loss, grads = loss_and_grad(t)(**mx_batch(batch(t.params)))
    opt.update(t, grads)
    mx.eval(t.parameters(), opt.state)
    assert np.isfinite(loss.item()) and all(v.dtype == mx.float32 for v in adapter_state(t).values())
    assert all(np.abs(np.array(g)).max() > 0 for _, g in tree_flatten(grads))
    for k, v in tree_flatten(t.parameters()):
        if ".lora_" not in k:
            assert raw(v).dtype == frozen[k].dtype and np.array_equal(raw(v), frozen[k]), k


@pytest.mark.parametrize("rows", [1, 64])  # the fused kernel for few rows, the dequantized GEMM for many
def test_frozen_quantized_layers_keep_their_input_gradient(rows):
    from flux_1.training.adapters import FrozenLinear

    t = tiny_transformer()
    quantize_loaded(t, layer_plan(t, "transformer", QuantSpec(bits=4)))
    name = "double_blocks.0.img_mlp.layers.0"
    x = mx.random.normal((rows, 32), key=mx.random.key(2))
    c = mx.random.normal((rows, 64), key=mx.random.key(3))
    grad = lambda layer: mx.grad(lambda x: mx.sum(layer(x) * c))(x)  # noqa: E731
    expected, y = grad(get(t, name)), get(t, name)(x)
    attach(t, AdapterConfig(targets="attention"))
    layer = get(t, name)  # not a target: frozen, differentiated w.r.t. its input only
    assert isinstance(layer, FrozenLinear) and not layer.trainable_parameters()
    assert np.array_equal(np.array(layer(x)), np.array(y))
    np.testing.assert_allclose(np.array(grad(layer)), np.array(expected), rtol=1e-5, atol=1e-6)
    detach(t)
    assert type(get(t, name)).__name__ == "QuantizedLinear"
