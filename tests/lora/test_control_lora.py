"""BFL Control LoRAs (FLUX.1-Canny/Depth-dev-lora) on plain dev: img_in widened, norm weights replaced.

First on the tiny model of `common` (img_in 8 -> 16 inputs): the widened weight is [W | 0] + delta, the
bias is kept, params.in_channels follows, narrower LoRAs on the widened layer are zero-padded, norm
weights are replaced (at any non-zero strength, the last LoRA winning) and everything is restored on
removal (bit-exact on the side path). Then against diffusers on the tiny FLUX.1-dev checkpoint
(img_in 64 -> 128), with a file in the BFL control key format:
- always (torch + diffusers): diffusers' own `FluxLoraLoaderMixin` steps run by hand without PEFT
  (`lora_state_dict` -> `_convert_bfl_flux_control_lora_to_diffusers`, its block counts and widths
  set to the tiny model's; `_maybe_expand_transformer_param_shape_or_error_`;
  `_maybe_expand_lora_state_dict`; `_load_norm_into_transformer`), LoRA deltas merged by hand as PEFT
  merges them (W += s B A, bias += s b_B);
- with PEFT installed: the real `FluxControlPipeline.load_lora_weights` + `fuse_lora`, then
  `unload_lora_weights(reset_to_overwritten_params=True)`.
Both compare the transformer output on 128-channel inputs, the x_embedder weight and bias, the norm
weights and `in_channels`.
"""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from flux_1.lora import LoRA, LoRAError, LoRALinear, LoRAStack, bake, load_lora

from .common import CTX, IN, VEC, D, Rand, effective_weight, get, tiny_transformer, write

NORMS = [
    "double_blocks.0.img_attn.norm.query_norm", "double_blocks.0.img_attn.norm.key_norm",
    "double_blocks.0.txt_attn.norm.query_norm", "double_blocks.0.txt_attn.norm.key_norm",
    "single_blocks.0.norm.query_norm", "single_blocks.0.norm.key_norm",
]  # fmt: skip


def control(seed: int = 0, rank: int = 2, width: int = 2 * IN, norms: bool = True) -> dict[str, np.ndarray]:
    """A BFL-format control LoRA for the tiny model: img_in (width inputs) with a bias, one qkv, norms."""
    r = Rand(seed)
    t = {
        "img_in.lora_A.weight": r(rank, width), "img_in.lora_B.weight": r(D, rank), "img_in.lora_B.bias": r(D),
        "double_blocks.0.img_attn.qkv.lora_A.weight": r(rank, D),
        "double_blocks.0.img_attn.qkv.lora_B.weight": r(3 * D, rank),
    }  # fmt: skip
    if norms:  # one head: head_dim = D
        t.update({f"{n}.scale": (1 + r(D)).astype(np.float32) for n in NORMS})
    return t


def lora(name: str, tensors: dict[str, np.ndarray]) -> LoRA:
    return LoRA(name, {k: mx.array(v) for k, v in tensors.items()})


def img_in_delta(t: dict[str, np.ndarray], width: int) -> np.ndarray:
    d = t["img_in.lora_B.weight"].astype(np.float64) @ t["img_in.lora_A.weight"]
    return np.pad(d, [(0, 0), (0, width - d.shape[1])])


def widened(w: np.ndarray, width: int) -> np.ndarray:
    return np.pad(w.astype(np.float64), [(0, 0), (0, width - w.shape[1])])


def snapshot(model) -> dict[str, np.ndarray]:
    return {
        "w": np.array(model.img_in.weight), "b": np.array(model.img_in.bias),
        **{n: np.array(get(model, n).weight) for n in NORMS},
    }


def assert_restored(model, before: dict[str, np.ndarray], exact: bool = True):
    assert type(model.img_in) is nn.Linear and model.params.in_channels == IN
    check = np.testing.assert_array_equal if exact else lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
    check(np.array(model.img_in.weight), before["w"])
    np.testing.assert_array_equal(np.array(model.img_in.bias), before["b"])
    for n in NORMS:
        np.testing.assert_array_equal(np.array(get(model, n).weight), before[n])
        assert getattr(get(model, n), "_lora_own_weight", None) is None


def forward(model, channels: int) -> mx.array:
    r = Rand(5)
    n, L = 6, 3
    img_ids = np.stack([np.zeros(n), np.arange(n) // 3, np.arange(n) % 3], axis=1).astype(np.float32)
    return model(
        mx.array(r(1, n, channels)), mx.array(r(1, L, CTX)), mx.array(r(1, VEC)), mx.array([0.5]),
        mx.array(img_ids), mx.zeros((L, 3)), guidance=mx.array([3.5]),
    )  # fmt: skip


@pytest.mark.parametrize("merge", [False, True])
def test_img_in_widened_then_restored(merge):
    model = tiny_transformer()
    before = snapshot(model)
    t = control()
    stack = LoRAStack(merge)
    report = stack.add(lora("canny", t), 0.8, model)
    assert f"img_in widened {IN} -> {2 * IN}" in report.line() and "6 norm weights replaced" in report.line()
    assert report.matched == report.total and not report.skipped

    assert model.params.in_channels == 2 * IN and isinstance(model.img_in, LoRALinear)
    assert model.img_in.weight.shape == (D, 2 * IN)
    if hasattr(model, "input_channels"):
        assert model.input_channels == 2 * IN
    want = widened(before["w"], 2 * IN) + 0.8 * img_in_delta(t, 2 * IN)
    np.testing.assert_allclose(effective_weight(model.img_in), want, atol=1e-5)
    bias = np.array(model.img_in(mx.zeros((1, 2 * IN))))[0]
    np.testing.assert_allclose(bias, before["b"] + 0.8 * t["img_in.lora_B.bias"], atol=1e-6)
    for n in NORMS:  # the file's values as they are, whatever the strength (diffusers)
        np.testing.assert_array_equal(np.array(get(model, n).weight), t[f"{n}.scale"])
    assert forward(model, 2 * IN).shape == (1, 6, IN)
    with pytest.raises(ValueError):  # the latents alone no longer fit
        forward(model, IN)

    stack.remove(model)
    assert_restored(model, before, exact=not merge)
    assert forward(model, IN).shape == (1, 6, IN)


def test_strength_zero_puts_the_own_norms_back():
    model = tiny_transformer()
    before = snapshot(model)
    t = control()
    stack = LoRAStack()
    stack.add(lora("depth", t), 1.0, model)
    stack.set_scales([0.0], model)
    for n in NORMS:
        np.testing.assert_array_equal(np.array(get(model, n).weight), before[n])
    # still as wide (the pipeline keeps concatenating the control latents), with zeros in the new columns
    assert model.params.in_channels == 2 * IN
    np.testing.assert_array_equal(np.array(model.img_in.weight), widened(before["w"], 2 * IN))
    np.testing.assert_allclose(effective_weight(model.img_in), widened(before["w"], 2 * IN), atol=1e-7)
    stack.set_scales([0.5], model)
    for n in NORMS:
        np.testing.assert_array_equal(np.array(get(model, n).weight), t[f"{n}.scale"])
    stack.remove(model)
    assert_restored(model, before)


@pytest.mark.parametrize("control_first", [False, True])
def test_narrow_lora_is_zero_padded_on_widened_img_in(control_first):
    model = tiny_transformer()
    before = snapshot(model)
    c, plain = control(1), control(2, width=IN, norms=False)
    stack = LoRAStack()
    order = [("canny", c), ("style", plain)] if control_first else [("style", plain), ("canny", c)]
    for name, t in order:
        stack.add(lora(name, t), 1.0, model)
    want = widened(before["w"], 2 * IN) + img_in_delta(c, 2 * IN) + img_in_delta(plain, 2 * IN)
    np.testing.assert_allclose(effective_weight(model.img_in), want, atol=1e-5)
    stack.remove(model, name="canny")  # back to IN columns, the other LoRA still live
    assert model.params.in_channels == IN and model.img_in.weight.shape == (D, IN)
    np.testing.assert_allclose(effective_weight(model.img_in), before["w"] + img_in_delta(plain, IN), atol=1e-5)
    for n in NORMS:
        np.testing.assert_array_equal(np.array(get(model, n).weight), before[n])
    stack.remove(model)
    assert_restored(model, before)


def test_last_control_lora_wins_the_norms():
    model = tiny_transformer()
    before = snapshot(model)
    a, b = control(3), control(4)
    stack = LoRAStack()
    stack.add(lora("a", a), 1.0, model)
    stack.add(lora("b", b), 1.0, model)
    norm = get(model, NORMS[0])
    np.testing.assert_array_equal(np.array(norm.weight), b[f"{NORMS[0]}.scale"])
    stack.set_strength("b", 0.0, model)
    np.testing.assert_array_equal(np.array(norm.weight), a[f"{NORMS[0]}.scale"])
    stack.set_strength("b", 1.0, model)
    stack.remove(model, name="b")
    np.testing.assert_array_equal(np.array(norm.weight), a[f"{NORMS[0]}.scale"])
    stack.remove(model)
    assert_restored(model, before)


def test_norms_in_the_model_dtype_and_diffusers_spelling():
    model = tiny_transformer()
    model.set_dtype(mx.bfloat16)
    t = control(norms=False)
    t["transformer.transformer_blocks.0.attn.norm_added_k.weight"] = v = np.linspace(0.5, 1.5, D, dtype=np.float32)
    LoRAStack().add(lora("diffusers-named", t), 1.0, model)
    norm = get(model, "double_blocks.0.txt_attn.norm.key_norm")
    assert norm.weight.dtype == mx.bfloat16
    as_bf16 = mx.array(v).astype(mx.bfloat16).astype(mx.float32)
    np.testing.assert_array_equal(np.array(norm.weight.astype(mx.float32)), np.array(as_bf16))


def test_quantized_model_keeps_img_in_full_precision():
    model = tiny_transformer()
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear) and p != "img_in"
                and m.weight.shape[1] % 32 == 0)  # fmt: skip
    before = snapshot(model)
    t = control()
    stack = LoRAStack()
    stack.add(lora("canny", t), 1.0, model)
    assert model.img_in.weight.shape == (D, 2 * IN) and model.double_blocks[0].img_attn.qkv.quantized
    np.testing.assert_allclose(
        effective_weight(model.img_in), widened(before["w"], 2 * IN) + img_in_delta(t, 2 * IN), atol=1e-5
    )
    assert np.isfinite(np.array(forward(model, 2 * IN))).all()
    stack.remove(model)
    assert_restored(model, before)


def test_bake_keeps_the_widened_layer_and_the_norms():
    model = tiny_transformer()
    before = snapshot(model)
    t = control()
    LoRAStack(merge=True).add(lora("canny", t), 1.0, model)
    bake(model)
    assert type(model.img_in) is nn.Linear and model.img_in.weight.shape == (D, 2 * IN)
    assert model.params.in_channels == 2 * IN
    np.testing.assert_allclose(
        np.array(model.img_in.weight), widened(before["w"], 2 * IN) + img_in_delta(t, 2 * IN), atol=1e-5
    )
    for n in NORMS:
        np.testing.assert_array_equal(np.array(get(model, n).weight), t[f"{n}.scale"])
        assert getattr(get(model, n), "_lora_own_weight", None) is None


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({f"{NORMS[0]}.scale": np.ones(D // 2, np.float32)}), r"has shape \(16,\), expected \(32,\)"),
    (lambda t: t[f"{NORMS[1]}.scale"].__setitem__(0, np.nan), "NaN"),
    (lambda t: t.update({f"{NORMS[2]}.scale": np.ones(D, np.int32)}), "floating point"),
])  # fmt: skip
def test_bad_norm_weights_are_refused_and_nothing_changes(tmp_path, change, match):
    model = tiny_transformer()
    before = snapshot(model)
    t = control()
    change(t)
    with pytest.raises(LoRAError, match=match) as info:
        LoRAStack.load([write(tmp_path, "bad", t)], None, model, log=None)
    assert "bad.safetensors" in str(info.value)
    assert_restored(model, before)


def test_norm_replacements_alone_are_no_lora(tmp_path):
    t = {f"{n}.scale": np.ones(D, np.float32) for n in NORMS}
    with pytest.raises(LoRAError, match="no key matches"):
        LoRAStack.load([write(tmp_path, "norms", t)], None, tiny_transformer(), log=None)


def test_widening_by_a_file_read_from_disk(tmp_path):
    model = tiny_transformer()
    stack = LoRAStack.load([write(tmp_path, "canny", control())], [1.0], model, log=None)
    assert model.params.in_channels == 2 * IN and stack.entries["canny"].report.norms == len(NORMS)
    assert load_lora(write(tmp_path, "again", control())).tensors  # readable as any LoRA


# ---------------------------------------------------------------------------------------------
# Against diffusers on the tiny FLUX.1-dev checkpoint (hidden 64, 2 + 2 blocks, img_in 64 -> 128)

TINY = dict(double=2, single=2, hidden=64, mlp=256, context=32, pooled=64, time=256, latent=64)


def bfl_control_file(seed: int = 0, rank: int = 4) -> dict[str, np.ndarray]:
    """Every key BFL's control LoRA has (diffusers' converter pops them all), at the tiny sizes, each
    linear with lora_B.bias (BFL LinearLora(lora_bias=True)). final_layer.adaLN_modulation.1's down
    has equal rank halves: diffusers' BFL-control converter also swaps the rows of lora_A there (a
    bug; only lora_B's rows are in the other order), which equal halves make harmless."""
    r, h = Rand(seed), TINY["hidden"]
    t = {}

    def linear(stem: str, out: int, inp: int):
        t[f"{stem}.lora_A.weight"] = r(rank, inp) / 2
        t[f"{stem}.lora_B.weight"] = r(out, rank) / 2
        t[f"{stem}.lora_B.bias"] = r(out) / 4

    for stem, out, inp in [
        ("img_in", h, 2 * TINY["latent"]), ("txt_in", h, TINY["context"]),
        ("time_in.in_layer", h, TINY["time"]), ("time_in.out_layer", h, h),
        ("vector_in.in_layer", h, TINY["pooled"]), ("vector_in.out_layer", h, h),
        ("guidance_in.in_layer", h, TINY["time"]), ("guidance_in.out_layer", h, h),
        ("final_layer.linear", TINY["latent"], h), ("final_layer.adaLN_modulation.1", 2 * h, h),
    ]:  # fmt: skip
        linear(stem, out, inp)
    a = t["final_layer.adaLN_modulation.1.lora_A.weight"]
    a[rank // 2 :] = a[: rank // 2]
    for i in range(TINY["double"]):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", TINY["mlp"], h)
            linear(f"{b}_mlp.2", h, TINY["mlp"])
            for n in ("query_norm", "key_norm"):
                t[f"{b}_attn.norm.{n}.scale"] = 1 + r(32)
    for i in range(TINY["single"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.modulation.lin", 3 * h, h)
        linear(f"{b}.linear1", 3 * h + TINY["mlp"], h)
        linear(f"{b}.linear2", h, h + TINY["mlp"])
        for n in ("query_norm", "key_norm"):
            t[f"{b}.norm.{n}.scale"] = 1 + r(32)
    return t


def tiny_converter():
    """diffusers' `_convert_bfl_flux_control_lora_to_diffusers` with FLUX.1's sizes, which it hard-codes,
    replaced by the tiny checkpoint's (nothing else changed)."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    src = inspect.getsource(conversion._convert_bfl_flux_control_lora_to_diffusers)
    for old, new in [("num_layers = 19", f"num_layers = {TINY['double']}"),
                     ("num_single_layers = 38", f"num_single_layers = {TINY['single']}"),
                     ("inner_dim = 3072", f"inner_dim = {TINY['hidden']}")]:  # fmt: skip
        assert src.count(old) == 1, f"diffusers changed: no '{old}' in its BFL control converter"
        src = src.replace(old, new)
    namespace = dict(vars(conversion))
    exec(src, namespace)  # noqa: S102
    return namespace["_convert_bfl_flux_control_lora_to_diffusers"]


@pytest.fixture
def tiny_control(monkeypatch):
    pytest.importorskip("torch")
    lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")
    monkeypatch.setattr(lora_pipeline, "_convert_bfl_flux_control_lora_to_diffusers", tiny_converter())
    return lora_pipeline


def inputs(seed: int = 1, grid=(3, 4), txt_len: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    (h, w), n = grid, grid[0] * grid[1]
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return {
        "img": rng.standard_normal((1, n, 2 * TINY["latent"])).astype(np.float32),
        "txt": rng.standard_normal((1, txt_len, TINY["context"])).astype(np.float32),
        "pooled": rng.standard_normal((1, TINY["pooled"])).astype(np.float32),
        "t": np.array([0.6], np.float32), "g": np.array([3.5], np.float32),
        "img_ids": ids.reshape(n, 3), "txt_ids": np.zeros((txt_len, 3), np.float32),
    }  # fmt: skip


def run_theirs(model, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(
            hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["pooled"]), timestep=torch.from_numpy(x["t"]),
            img_ids=torch.from_numpy(x["img_ids"]), txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=torch.from_numpy(x["g"]), return_dict=False,
        )[0].numpy()  # fmt: skip


def run_ours(model, x) -> np.ndarray:
    a = {k: mx.array(v) for k, v in x.items()}
    out = model(a["img"], a["txt"], a["pooled"], a["t"], a["img_ids"], a["txt_ids"], guidance=a["g"])
    return np.array(out)


DIFFUSERS_NORMS = {  # ours -> diffusers
    **{f"double_blocks.{i}.{s}_attn.norm.{n}_norm": f"transformer_blocks.{i}.attn.norm_{a}{n[0]}"
       for i in range(2) for s, a in (("img", ""), ("txt", "added_")) for n in ("query", "key")},
    **{f"single_blocks.{i}.norm.{n}_norm": f"single_transformer_blocks.{i}.attn.norm_{n[0]}"
       for i in range(2) for n in ("query", "key")},
}  # fmt: skip


def ours_loaded(root, path, strength: float):
    from flux_1.loading.folder import load_folder_component

    model = load_folder_component(root, "transformer", mx.float32)
    before = {"w": np.array(model.img_in.weight), **{n: np.array(get(model, n).weight) for n in DIFFUSERS_NORMS}}
    stack = LoRAStack(merge=True)
    report = stack.add(load_lora(path), strength, model)
    assert report.matched == report.total and not report.skipped, report.line()
    return model, stack, before


def compare(ours, theirs, x, strength) -> dict[str, float]:
    """Output, x_embedder weight/bias, norms and in_channels of both; returns the measured gaps."""
    out_ours, out_theirs = run_ours(ours, x), run_theirs(theirs, x)
    rel = float(np.abs(out_ours - out_theirs).max() / np.abs(out_theirs).max())
    assert rel <= 1e-4, rel
    x_emb = theirs.x_embedder
    x_emb = getattr(x_emb, "base_layer", x_emb)  # PEFT's wrapper around the (expanded) linear, once fused
    w_theirs = x_emb.weight.detach().double().numpy()
    w_gap = float(np.abs(effective_weight(ours.img_in) - w_theirs).max())
    assert w_theirs.shape == (TINY["hidden"], 2 * TINY["latent"]) and w_gap <= 1e-5, w_gap
    b_ours = np.array(ours.img_in(mx.zeros((1, 2 * TINY["latent"]))))[0]
    np.testing.assert_allclose(b_ours, x_emb.bias.detach().numpy(), atol=1e-5)
    assert theirs.config.in_channels == ours.params.in_channels == 2 * TINY["latent"]
    for n, d in DIFFUSERS_NORMS.items():
        np.testing.assert_array_equal(np.array(get(ours, n).weight), theirs.get_submodule(d).weight.detach().numpy())
    return {"strength": strength, "output rel": rel, "x_embedder max abs": w_gap}


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_diffusers_expansion_steps(tmp_path, tiny_dev, tiny_control, strength):
    """diffusers' FluxLoraLoaderMixin steps without PEFT; the LoRA deltas merged by hand."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    path = write(tmp_path, "canny", bfl_control_file())
    mixin = tiny_control.FluxLoraLoaderMixin
    state = mixin.lora_state_dict(load_file(str(path)))
    lora_sd = {k: v for k, v in state.items() if "lora" in k}
    norm_sd = {k: v for k, v in state.items() if any(n in k for n in mixin._control_lora_supported_norm_keys)}
    assert len(lora_sd) + len(norm_sd) == len(state)

    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tiny_dev / "transformer", torch_dtype=torch.float32)
    assert mixin._maybe_expand_transformer_param_shape_or_error_(theirs, lora_sd, norm_sd)
    lora_sd = mixin._maybe_expand_lora_state_dict(theirs, lora_sd)
    mixin._load_norm_into_transformer(dict(norm_sd), theirs)
    with torch.no_grad():  # PEFT's merge with scaling = strength * lora_alpha / r, lora_alpha = r
        for key in [k for k in lora_sd if k.endswith(".lora_A.weight")]:
            stem = key[: -len(".lora_A.weight")]
            layer = theirs.get_submodule(stem.removeprefix("transformer."))
            layer.weight += strength * (lora_sd[f"{stem}.lora_B.weight"] @ lora_sd[key])
            layer.bias += strength * lora_sd[f"{stem}.lora_B.bias"]

    ours, stack, before = ours_loaded(tiny_dev, path, strength)
    result = compare(ours, theirs, inputs(), strength)
    print(f"\ncontrol LoRA vs diffusers (expansion steps, hand merge): {result}")
    stack.remove(ours)
    assert ours.params.in_channels == TINY["latent"]
    np.testing.assert_allclose(np.array(ours.img_in.weight), before["w"], atol=1e-6)  # merged: unmerged in f32
    for n in DIFFUSERS_NORMS:
        np.testing.assert_array_equal(np.array(get(ours, n).weight), before[n])


def test_matches_diffusers_control_pipeline(tmp_path, tiny_dev, tiny_control):
    """The real path, with PEFT: FluxControlPipeline.load_lora_weights, fuse_lora, then unloading."""
    pytest.importorskip("peft")
    import diffusers
    import torch

    path = write(tmp_path, "canny", bfl_control_file(seed=3))
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tiny_dev / "transformer", torch_dtype=torch.float32)
    original = theirs.x_embedder.weight.detach().clone()
    pipe = diffusers.FluxControlPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=theirs,
    )  # fmt: skip
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    ours, stack, before = ours_loaded(tiny_dev, path, 0.8)
    result = compare(ours, pipe.transformer, inputs(seed=2, grid=(2, 5)), 0.8)
    print(f"\ncontrol LoRA vs diffusers (FluxControlPipeline.load_lora_weights + fuse_lora): {result}")

    pipe.unfuse_lora()
    pipe.unload_lora_weights(reset_to_overwritten_params=True)
    stack.remove(ours)
    assert pipe.transformer.config.in_channels == ours.params.in_channels == TINY["latent"]
    torch.testing.assert_close(pipe.transformer.x_embedder.weight, original)
    np.testing.assert_allclose(np.array(ours.img_in.weight), original.numpy(), atol=1e-6)
    for n, d in DIFFUSERS_NORMS.items():
        np.testing.assert_array_equal(np.array(get(ours, n).weight), before[n])
        np.testing.assert_array_equal(pipe.transformer.get_submodule(d).weight.detach().numpy(), before[n])
