"""Every LoRA format, written with its real key names, against the format's own arithmetic.

Each test writes a file, applies it to a tiny model with our names, and compares the change of every
linear layer's effective weight (side path, then merged) with the delta computed plainly here.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from flux_1.lora import LoRAError, LoRAStack, load_lora

from .common import (
    CLIP_D,
    CLIP_MLP,
    CTX,
    IN,
    MLP,
    TIME,
    VEC,
    D,
    Rand,
    effective_weights,
    get,
    linear_names,
    swap,
    tiny_clip,
    tiny_transformer,
    write,
)

T, C = "transformer", "clip"


def check(tmp_path, tensors, expected, metadata=None, guidance=True, strength=1.0, bias=None):
    """Apply the file; every layer must change by strength * expected (zero where not listed)."""
    models = {T: tiny_transformer(guidance), C: tiny_clip()}
    names = {c: linear_names(m) for c, m in models.items()}
    before = {c: effective_weights(m, names[c]) for c, m in models.items()}
    bias_before = {(c, n): np.array(get(models[c], n)(_zeros(models[c], n))) for c, n in bias or {}}
    stack = LoRAStack()
    report = stack.add(load_lora(write(tmp_path, "lora", tensors, metadata)), strength, models[T], models[C])
    for merge in (False, True):
        stack.set_merge(merge, models[T], models[C])
        for c, m in models.items():
            after = effective_weights(m, names[c])
            for n in names[c]:
                want = strength * expected.get((c, n), 0.0)
                np.testing.assert_allclose(after[n] - before[c][n], np.broadcast_to(want, after[n].shape),
                                           atol=2e-5, err_msg=f"{c} {n} merge={merge}")  # fmt: skip
    for (c, n), b in (bias or {}).items():
        got = np.array(get(models[c], n)(_zeros(models[c], n)))[0] - bias_before[(c, n)][0]
        np.testing.assert_allclose(got, strength * b, atol=1e-5)
    return report


def _zeros(model, name):
    return mx.zeros((1, get(model, name)["weight"].shape[1]))


def lowrank(t, r, key_down, key_up, out, inp, rank, alpha=None, alpha_key=None):
    """Writes down/up (and alpha) into t; returns the format's delta: (alpha/rank or 1) * up @ down."""
    down, up = r(rank, inp), r(out, rank)
    t[key_down], t[key_up] = down, up
    if alpha is not None:
        t[alpha_key] = np.array(alpha, np.float32)
    return (alpha / rank if alpha else 1.0) * up @ down


def kohya(t, r, stem, out, inp, rank, alpha=None):
    return lowrank(
        t, r, f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", out, inp, rank, alpha, f"{stem}.alpha"
    )


def peft(t, r, stem, out, inp, rank, alpha=None):
    return lowrank(
        t, r, f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", out, inp, rank, alpha, f"{stem}.alpha"
    )


def rows(total_rows, inp, *parts):
    """A fused delta from (row offset, delta) parts; other rows stay zero."""
    out = np.zeros((total_rows, inp), np.float32)
    for offset, delta in parts:
        out[offset : offset + delta.shape[0]] += delta
    return out


def test_kohya(tmp_path):
    t, r, e = {}, Rand(1), {}
    e[T, "double_blocks.0.img_attn.qkv"] = kohya(
        t, r, "lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D, 4, 2.0
    )
    e[T, "double_blocks.0.txt_attn.proj"] = kohya(
        t, r, "lora_unet_double_blocks_0_txt_attn_proj", D, D, 2, 8.0
    )
    e[T, "double_blocks.0.img_mod.lin"] = kohya(
        t, r, "lora_unet_double_blocks_0_img_mod_lin", 6 * D, D, 2, 1.0
    )
    e[T, "double_blocks.0.txt_mlp.layers.0"] = kohya(
        t, r, "lora_unet_double_blocks_0_txt_mlp_0", MLP, D, 2, 1.0
    )
    e[T, "double_blocks.0.img_mlp.layers.2"] = kohya(
        t, r, "lora_unet_double_blocks_0_img_mlp_2", D, MLP, 2, 1.0
    )
    # single-block linear1: one down shared by q | k | v | mlp
    e[T, "single_blocks.0.linear1"] = kohya(t, r, "lora_unet_single_blocks_0_linear1", 3 * D + MLP, D, 3, 6.0)
    e[T, "single_blocks.0.linear2"] = kohya(t, r, "lora_unet_single_blocks_0_linear2", D, D + MLP, 2, 1.0)
    e[T, "single_blocks.0.modulation.lin"] = kohya(
        t, r, "lora_unet_single_blocks_0_modulation_lin", 3 * D, D, 2
    )
    e[T, "img_in"] = kohya(t, r, "lora_unet_img_in", D, IN, 2)  # no alpha: scale 1
    e[T, "txt_in"] = kohya(t, r, "lora_unet_txt_in", D, CTX, 2, 1.0)
    e[T, "time_in.in_layer"] = kohya(t, r, "lora_unet_time_in_in_layer", D, TIME, 2, 4.0)
    e[T, "vector_in.out_layer"] = kohya(t, r, "lora_unet_vector_in_out_layer", D, D, 2, 1.0)
    e[T, "guidance_in.in_layer"] = kohya(
        t, r, "lora_unet_guidance_in_in_layer", D, TIME, 2, 0.0
    )  # alpha 0: scale 1
    e[T, "final_layer.linear"] = kohya(t, r, "lora_unet_final_layer_linear", IN, D, 2, 1.0)
    # BFL order (shift | scale) is ours: no swap
    e[T, "final_layer.adaLN_modulation.layers.1"] = kohya(
        t, r, "lora_unet_final_layer_adaLN_modulation_1", 2 * D, D, 2, 1.0
    )
    e[C, "encoder.layers.1.self_attn.k_proj"] = kohya(
        t, r, "lora_te1_text_model_encoder_layers_1_self_attn_k_proj", CLIP_D, CLIP_D, 2, 1.0
    )
    e[C, "encoder.layers.0.mlp.fc2"] = kohya(
        t, r, "lora_te_text_model_encoder_layers_0_mlp_fc2", CLIP_D, CLIP_MLP, 2
    )
    kohya(t, r, "lora_te3_encoder_block_0_layer_0_SelfAttention_q", 8, 8, 2, 1.0)  # T5: reported, skipped
    report = check(tmp_path, t, e, strength=0.7)
    assert report.matched == len(t) - 3 and report.layers == {T: 15, C: 2}
    assert "T5" in report.line() and "lora_te3_" in report.line()


@pytest.mark.parametrize(
    "target,parts", [("double_blocks.0.txt_attn.qkv", [D] * 3), ("single_blocks.0.linear1", [D] * 3 + [MLP])]
)
def test_kohya_split_qkv_block_diagonal(tmp_path, target, parts):
    """sd-scripts split_qkv: down = cat(A_q, A_k, A_v), up block-diagonal; alpha / (3r) like every loader."""
    r, rank, alpha = Rand(2), 2, 2.0
    downs = [r(rank, D) for _ in parts]
    ups = [r(n, rank) for n in parts]
    up = np.zeros((sum(parts), rank * len(parts)), np.float32)
    offsets = np.cumsum([0] + parts)
    for i, u in enumerate(ups):
        up[offsets[i] : offsets[i + 1], i * rank : (i + 1) * rank] = u
    stem = "lora_unet_" + target.replace(".", "_")
    t = {
        f"{stem}.lora_down.weight": np.concatenate(downs),
        f"{stem}.lora_up.weight": up,
        f"{stem}.alpha": np.array(alpha),
    }
    scale = alpha / (rank * len(parts))
    want = rows(sum(parts), D, *[(offsets[i], scale * ups[i] @ downs[i]) for i in range(len(parts))])
    check(tmp_path, t, {(T, target): want})


def test_diffusers_peft(tmp_path):
    t, r, e = {}, Rand(3), {}
    p = "transformer."
    # per-part LoRAs onto our fused qkv; to_k absent, so its rows stay unchanged
    e[T, "double_blocks.0.img_attn.qkv"] = rows(
        3 * D, D,
        (0, peft(t, r, p + "transformer_blocks.0.attn.to_q", D, D, 2)),
        (2 * D, peft(t, r, p + "transformer_blocks.0.attn.to_v", D, D, 3, alpha=1.5)),
    )  # fmt: skip
    e[T, "double_blocks.0.txt_attn.qkv"] = rows(
        3 * D, D, (D, peft(t, r, p + "transformer_blocks.0.attn.add_k_proj", D, D, 2))
    )
    e[T, "single_blocks.0.linear1"] = rows(
        3 * D + MLP, D,
        (0, peft(t, r, p + "single_transformer_blocks.0.attn.to_q", D, D, 2)),
        (D, peft(t, r, p + "single_transformer_blocks.0.attn.to_k", D, D, 4)),
        (2 * D, peft(t, r, p + "single_transformer_blocks.0.attn.to_v", D, D, 2)),
        (3 * D, peft(t, r, p + "single_transformer_blocks.0.proj_mlp", MLP, D, 3)),
    )  # fmt: skip
    e[T, "single_blocks.0.linear2"] = peft(t, r, p + "single_transformer_blocks.0.proj_out", D, D + MLP, 2)
    e[T, "single_blocks.0.modulation.lin"] = peft(
        t, r, p + "single_transformer_blocks.0.norm.linear", 3 * D, D, 2
    )
    e[T, "double_blocks.0.img_attn.proj"] = peft(t, r, p + "transformer_blocks.0.attn.to_out.0", D, D, 2)
    e[T, "double_blocks.0.txt_attn.proj"] = peft(t, r, p + "transformer_blocks.0.attn.to_add_out", D, D, 2)
    e[T, "double_blocks.0.img_mlp.layers.0"] = peft(t, r, p + "transformer_blocks.0.ff.net.0.proj", MLP, D, 2)
    e[T, "double_blocks.0.txt_mlp.layers.2"] = peft(
        t, r, p + "transformer_blocks.0.ff_context.net.2", D, MLP, 2
    )
    e[T, "double_blocks.0.img_mod.lin"] = peft(t, r, p + "transformer_blocks.0.norm1.linear", 6 * D, D, 2)
    e[T, "double_blocks.0.txt_mod.lin"] = peft(
        t, r, p + "transformer_blocks.0.norm1_context.linear", 6 * D, D, 2
    )
    e[T, "img_in"] = peft(t, r, p + "x_embedder", D, IN, 2)
    e[T, "txt_in"] = peft(t, r, p + "context_embedder", D, CTX, 2)
    e[T, "time_in.out_layer"] = peft(t, r, p + "time_text_embed.timestep_embedder.linear_2", D, D, 2)
    e[T, "vector_in.in_layer"] = peft(t, r, p + "time_text_embed.text_embedder.linear_1", D, VEC, 2)
    e[T, "guidance_in.in_layer"] = peft(t, r, p + "time_text_embed.guidance_embedder.linear_1", D, TIME, 2)
    e[T, "final_layer.linear"] = peft(t, r, p + "proj_out", IN, D, 2)
    # diffusers' norm_out is (scale | shift), ours (shift | scale): the rows of B are swapped
    e[T, "final_layer.adaLN_modulation.layers.1"] = swap(peft(t, r, p + "norm_out.linear", 2 * D, D, 2))
    e[C, "encoder.layers.0.self_attn.q_proj"] = peft(
        t, r, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", CLIP_D, CLIP_D, 2
    )
    peft(t, r, "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", 8, 8, 2)  # T5: skipped
    report = check(tmp_path, t, e)
    assert report.matched == len(t) - 2


@pytest.mark.parametrize(
    "prefix,names",
    [
        ("", ("lora_A", "lora_B")),
        ("transformer.", ("lora_down", "lora_up")),
        ("transformer.", ("lora.down", "lora.up")),
    ],
)
def test_diffusers_variants(tmp_path, prefix, names):
    """DiffSynth (no prefix), lora_down/up under transformer. (diffusers' sharp_detailed_foot case)."""
    t, r = {}, Rand(4)
    stem = prefix + "single_transformer_blocks.0.proj_mlp"
    want = lowrank(t, r, f"{stem}.{names[0]}.weight", f"{stem}.{names[1]}.weight", MLP, D, 2)
    check(tmp_path, t, {(T, "single_blocks.0.linear1"): rows(3 * D + MLP, D, (3 * D, want))})


@pytest.mark.parametrize("prefixed", [True, False])
def test_diffusers_metadata_alphas(tmp_path, prefixed):
    """lora_adapter_metadata: scale = lora_alpha / r, alpha_pattern per module, rank from the tensors."""
    t, r = {}, Rand(5)
    p = "transformer."
    q = peft(t, r, p + "transformer_blocks.0.attn.to_q", D, D, 2) * (1.0 / 2)  # alpha_pattern: 1
    k = peft(t, r, p + "transformer_blocks.0.attn.to_k", D, D, 2) * (8.0 / 2)  # lora_alpha 8
    mlp = peft(t, r, p + "single_transformer_blocks.0.proj_mlp", MLP, D, 4) * (8.0 / 4)  # rank_pattern 4
    config = {"r": 2, "lora_alpha": 8, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 1},
              "rank_pattern": {"proj_mlp": 4}, "target_modules": ["to_q", "to_k", "proj_mlp"]}  # fmt: skip
    if prefixed:  # a pipeline's save_lora_weights: `transformer.`-prefixed LoraConfig fields
        config = {f"transformer.{k}": v for k, v in config.items()}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    check(
        tmp_path, t,
        {(T, "double_blocks.0.img_attn.qkv"): rows(3 * D, D, (0, q), (D, k)),
         (T, "single_blocks.0.linear1"): rows(3 * D + MLP, D, (3 * D, mlp))},
        metadata=meta,
    )  # fmt: skip


def test_bfl_and_comfyui_names(tmp_path):
    t, r, e = {}, Rand(6), {}
    dm = "diffusion_model."
    e[T, "double_blocks.0.img_attn.qkv"] = peft(
        t, r, dm + "double_blocks.0.img_attn.qkv", 3 * D, D, 4, alpha=2.0
    )
    e[T, "double_blocks.0.img_mlp.layers.0"] = kohya(t, r, dm + "double_blocks.0.img_mlp.0", MLP, D, 2, 1.0)
    e[T, "single_blocks.0.linear1"] = peft(t, r, dm + "single_blocks.0.linear1", 3 * D + MLP, D, 2)
    e[T, "final_layer.adaLN_modulation.layers.1"] = peft(
        t, r, dm + "final_layer.adaLN_modulation.1", 2 * D, D, 2
    )
    # fal Kontext trainer: base_model.model. + BFL names
    e[T, "double_blocks.0.txt_attn.qkv"] = peft(
        t, r, "base_model.model.double_blocks.0.txt_attn.qkv", 3 * D, D, 2
    )
    # BFL control LoRA: prefix-less BFL names, lora_B.bias; its norm replacements are applied
    e[T, "single_blocks.0.modulation.lin"] = peft(t, r, "single_blocks.0.modulation.lin", 3 * D, D, 2)
    t["single_blocks.0.modulation.lin.lora_B.bias"] = b = r(3 * D)
    t["double_blocks.0.img_attn.norm.query_norm.scale"] = r(D)  # one head: head_dim = D
    e[C, "encoder.layers.1.mlp.fc1"] = kohya(
        t, r, "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1", CLIP_MLP, CLIP_D, 2, 1.0
    )
    kohya(t, r, "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", 8, 8, 2, 1.0)
    report = check(tmp_path, t, e, bias={(T, "single_blocks.0.modulation.lin"): b})
    assert report.matched == len(t) - 3 and report.norms == 1
    assert "1 norm weights replaced" in report.line()


def test_xlabs(tmp_path):
    t, r, e = {}, Rand(7), {}

    def x(stem, out, inp):
        return lowrank(t, r, f"{stem}.down.weight", f"{stem}.up.weight", out, inp, 2)

    e[T, "double_blocks.0.img_attn.qkv"] = x("double_blocks.0.processor.qkv_lora1", 3 * D, D)
    e[T, "double_blocks.0.img_attn.proj"] = x("double_blocks.0.processor.proj_lora1", D, D)
    e[T, "double_blocks.0.txt_attn.qkv"] = x("diffusion_model.double_blocks.0.processor.qkv_lora2", 3 * D, D)
    e[T, "double_blocks.0.txt_attn.proj"] = x("double_blocks.0.processor.proj_lora2", D, D)
    # the single-block qkv LoRA covers q | k | v of linear1, not its MLP rows
    e[T, "single_blocks.0.linear1"] = rows(
        3 * D + MLP, D, (0, x("single_blocks.0.processor.qkv_lora", 3 * D, D))
    )
    e[T, "single_blocks.0.linear2"] = x("single_blocks.0.processor.proj_lora", D, D + MLP)
    check(tmp_path, t, e, strength=1.5)


def test_onetrainer(tmp_path):
    t, r, e = {}, Rand(8), {}
    lt = "lora_transformer_"
    e[T, "double_blocks.0.img_attn.qkv"] = rows(
        3 * D, D, (D, kohya(t, r, lt + "transformer_blocks_0_attn_to_k", D, D, 2, 1.0))
    )
    e[T, "single_blocks.0.linear1"] = rows(
        3 * D + MLP, D, (3 * D, kohya(t, r, lt + "single_transformer_blocks_0_proj_mlp", MLP, D, 4, 2.0))
    )
    e[T, "img_in"] = kohya(t, r, lt + "x_embedder", D, IN, 2, 2.0)
    e[T, "guidance_in.in_layer"] = kohya(
        t, r, lt + "time_text_embed_guidance_embedder_linear_1", D, TIME, 2, 2.0
    )
    e[T, "final_layer.adaLN_modulation.layers.1"] = swap(
        kohya(t, r, lt + "norm_out_linear", 2 * D, D, 2, 1.0)
    )
    e[C, "encoder.layers.0.mlp.fc2"] = kohya(
        t, r, "lora_te1_text_model_encoder_layers_0_mlp_fc2", CLIP_D, CLIP_MLP, 2, 1.0
    )
    check(tmp_path, t, e)


def lokr(t, r, stem, w1, w2, alpha=None):
    """LoKr factors w1, w2, each full (rows, cols) or factorized (rows, rank, cols) as _a @ _b.
    delta = kron(w1, w2) * alpha / rank when a factor is factorized (w2's rank first), else kron(w1, w2)."""
    full, dim = [], None
    for name, shape in (("w1", w1), ("w2", w2)):
        if len(shape) == 2:
            t[f"{stem}.lokr_{name}"] = full_w = r(*shape)
        else:
            t[f"{stem}.lokr_{name}_a"], t[f"{stem}.lokr_{name}_b"] = a, b = (
                r(shape[0], shape[1]),
                r(shape[1], shape[2]),
            )
            full_w, dim = a @ b, shape[1]
        full.append(full_w)
    if alpha is not None:
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
    return np.kron(*full) * (alpha / dim if alpha and dim else 1.0)


def loha(t, r, stem, out, inp, rank, alpha=None):
    """delta = (w1_a @ w1_b) * (w2_a @ w2_b) * (alpha / rank or 1)."""
    w = {
        f"hada_{f}_{ab}": r(*((out, rank) if ab == "a" else (rank, inp))) for f in ("w1", "w2") for ab in "ab"
    }
    t.update({f"{stem}.{k}": v for k, v in w.items()})
    if alpha is not None:
        t[f"{stem}.alpha"] = np.array(alpha, np.float32)
    return (
        (w["hada_w1_a"] @ w["hada_w1_b"])
        * (w["hada_w2_a"] @ w["hada_w2_b"])
        * (alpha / rank if alpha else 1.0)
    )


def test_lokr(tmp_path):
    t, r, e = {}, Rand(9), {}
    # full w1, factorized w2 (rank 2): scale alpha / 2
    q = lokr(t, r, "lycoris_transformer_blocks_0_attn_to_q", (4, 4), (8, 2, 8), alpha=1.0)
    e[T, "double_blocks.0.img_attn.qkv"] = rows(3 * D, D, (0, q))
    # both factors full: scale 1 whatever alpha says
    e[T, "double_blocks.0.img_attn.proj"] = lokr(
        t, r, "lora_unet_double_blocks_0_img_attn_proj", (4, 4), (8, 8), 3.0
    )
    # on a fused module: materialized whole (it cannot be split in low-rank form)
    e[T, "single_blocks.0.linear1"] = lokr(
        t, r, "lora_unet_single_blocks_0_linear1", (5, 1, 4), (32, 8), alpha=2.0
    )
    # diffusers-named norm_out: rows of the whole delta swapped
    e[T, "final_layer.adaLN_modulation.layers.1"] = swap(
        lokr(t, r, "transformer.norm_out.linear", (2, 4), (32, 8))
    )
    check(tmp_path, t, e)


def test_loha(tmp_path):
    t, r, e = {}, Rand(10), {}
    e[T, "single_blocks.0.linear2"] = loha(
        t, r, "lora_unet_single_blocks_0_linear2", D, D + MLP, 2, alpha=1.0
    )
    e[T, "double_blocks.0.img_mlp.layers.2"] = loha(
        t, r, "transformer.transformer_blocks.0.ff.net.2", D, MLP, 3
    )
    check(tmp_path, t, e)


def test_full_deltas(tmp_path):
    t, r, e = {}, Rand(11), {}
    t["diffusion_model.double_blocks.0.img_mod.lin.diff"] = e[T, "double_blocks.0.img_mod.lin"] = r(6 * D, D)
    t["diffusion_model.double_blocks.0.img_mod.lin.diff_b"] = b = r(6 * D)
    t["transformer.transformer_blocks.0.attn.to_v.diff"] = v = r(D, D)
    e[T, "double_blocks.0.img_attn.qkv"] = rows(3 * D, D, (2 * D, v))
    # BFL-named (no swap) and diffusers-named (swapped) deltas on the same layer add up
    t["lora_unet_final_layer_adaLN_modulation_1.diff"] = a = r(2 * D, D)
    t["transformer.norm_out.linear.diff"] = n = r(2 * D, D)
    e[T, "final_layer.adaLN_modulation.layers.1"] = a + swap(n)
    check(tmp_path, t, e, strength=-0.5, bias={(T, "double_blocks.0.img_mod.lin"): b})


def test_dora_magnitude_is_reported(tmp_path):
    t, r = {}, Rand(12)
    want = peft(t, r, "transformer.x_embedder", D, IN, 2)
    t["transformer.x_embedder.lora_magnitude_vector"] = r(D)
    report = check(tmp_path, t, {(T, "img_in"): want})
    assert "DoRA" in report.line() and report.matched == 2


def test_guidance_keys_on_schnell_are_reported(tmp_path):
    t, r = {}, Rand(13)
    want = kohya(t, r, "lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D, 2, 1.0)
    kohya(t, r, "lora_unet_guidance_in_in_layer", D, TIME, 2, 1.0)
    peft(t, r, "transformer.time_text_embed.guidance_embedder.linear_2", D, D, 2)
    report = check(tmp_path, t, {(T, "double_blocks.0.img_attn.qkv"): want}, guidance=False)
    assert report.matched == 3 and report.skipped.keys() == {
        "dev-only guidance_in keys (this model has no guidance embedder: schnell)"
    }
    assert len(next(iter(report.skipped.values()))) == 5


# ---------------------------------------------------------------------------------------------
# Refusals


def _add(tmp_path, tensors, **kw):
    return LoRAStack().add(
        load_lora(write(tmp_path, "bad", tensors, **kw)), 1.0, tiny_transformer(), tiny_clip()
    )


def test_zero_matched_keys_is_an_error(tmp_path):
    t, r = {}, Rand(14)
    peft(t, r, "transformer.some_block.0.linear", D, D, 2)
    with pytest.raises(LoRAError, match="no key matches"):
        _add(tmp_path, t)


def test_sd15_lora_is_refused(tmp_path):
    t, r = {}, Rand(15)
    kohya(t, r, "lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 2, 1.0)
    kohya(t, r, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 1280, 1280, 2, 1.0)
    # SD1.5's text encoder is CLIP-L too: these keys match our CLIP, yet the file is refused
    kohya(t, r, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", CLIP_D, CLIP_D, 2, 1.0)
    with pytest.raises(LoRAError, match="Stable Diffusion"):
        _add(tmp_path, t)


def test_sdxl_lora_is_refused(tmp_path):
    t, r = {}, Rand(16)
    kohya(t, r, "lora_unet_input_blocks_4_1_proj_in", 640, 640, 2, 1.0)
    kohya(t, r, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 2, 1.0)
    with pytest.raises(LoRAError, match="Stable Diffusion"):
        _add(tmp_path, t)


@pytest.mark.parametrize(
    "key,shape,other,want",
    [
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            (4, D + 1),
            ("lora_up", (3 * D, 4)),
            f"(rank, {D})",
        ),
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
            (3 * D, 3),
            ("lora_down", (4, D)),
            f"({3 * D}, 4)",
        ),
        # a fused-size B on one part of our fused module
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
            (3 * D, 4),
            ("lora_A", (4, D)),
            f"({D}, 4)",
        ),
    ],
)
def test_shape_mismatch_names_key_and_shapes(tmp_path, key, shape, other, want):
    r = Rand(17)
    stem, suffix = key.rsplit(".", 2)[0], other[0]
    t = {key: r(*shape), f"{stem}.{suffix}.weight": r(*other[1])}
    with pytest.raises(LoRAError) as info:
        _add(tmp_path, t)
    msg = str(info.value)
    assert key in msg and str(shape) in msg and want in msg, msg


@pytest.mark.parametrize("stem, out, inp, hint", [
    ("txt_in", D, 2 * CTX, "only img_in can be widened"),  # widening is for img_in alone
    ("img_in", D, IN + IN // 2, "whole factor of 8"),  # img_in: 64 -> 128 or 384, never 96
])  # fmt: skip
def test_widening_is_refused_elsewhere(tmp_path, stem, out, inp, hint):
    t, r = {}, Rand(18)
    peft(t, r, stem, out, inp, 2)
    with pytest.raises(LoRAError, match=hint) as info:
        _add(tmp_path, t)
    assert f"'{stem}.lora_A.weight' has shape (2, {inp})" in str(info.value)


def test_missing_up_is_an_error(tmp_path):
    with pytest.raises(LoRAError, match="no up"):
        _add(tmp_path, {"lora_unet_img_in.lora_down.weight": Rand(19)(2, IN)})
