"""Our reading of kohya, ComfyUI, XLabs and OneTrainer key names == diffusers' conversions.

At FLUX.1's real sizes (diffusers' converters hard-code them), with rank 1-4 LoRAs and only the
module shapes of a never-evaluated model, deltas compared through random probe vectors: for each
of our modules, ours sum_pieces up @ (down @ v) vs diffusers' per-part lora_B @ (lora_A @ v) mapped
back onto our module with the diffusers table (row blocks, norm_out swap).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flux_1.loading.tables import DIFFUSERS_TRANSFORMER, part_rows, resolve
from flux_1.lora import LoRA, linear_specs, resolve_lora

from .common import swap

torch = pytest.importorskip("torch")
conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
transformer = pytest.importorskip("flux_1.models.transformer")

H, MLP = 3072, 12288


@pytest.fixture(scope="module")
def specs():
    # Lazy: the random initial weights of a full-size model are never evaluated.
    return {
        "transformer": linear_specs(transformer.FluxTransformer(transformer.FluxParams(guidance_embed=True)))
    }


@pytest.fixture(scope="module")
def probes(specs):
    rng = np.random.default_rng(0)
    return {m: rng.standard_normal(inp).astype(np.float32) for m, (_, inp) in specs["transformer"].items()}


def ours(tensors, specs, probes) -> dict[str, np.ndarray]:
    patches, _ = resolve_lora(LoRA("ours", {k: mx.array(v.numpy()) for k, v in tensors.items()}), specs)
    out = {}
    for patch in patches:
        y = np.zeros(patch.shape[0], np.float32)
        for p in patch.pieces:
            down, up = p.factors()
            y[p.slot.row : p.slot.row + p.slot.rows] += np.array(up @ (down @ mx.array(probes[patch.module])))
        out[patch.module] = y
    return out


def theirs(converted, specs, probes) -> dict[str, np.ndarray]:
    out = {}
    for key, a in converted.items():
        if not key.endswith(".lora_A.weight") or key.startswith("text_encoder"):
            continue
        stem = key[: -len(".lora_A.weight")]
        b = converted[f"{stem}.lora_B.weight"]
        r = resolve(
            DIFFUSERS_TRANSFORMER, stem.removeprefix("transformer.")
        )  # non-block keys come unprefixed
        o, i = specs["transformer"][r.target]
        rows = part_rows(r.target, o, i, r.parts)
        y = b.double().numpy() @ (a.double().numpy() @ probes[r.target])
        y = swap(y) if r.swap_halves else y
        row = sum(rows[: r.part])
        out.setdefault(r.target, np.zeros(o))[row : row + rows[r.part]] += y
    return out


def compare(tensors, convert, specs, probes, expect_modules: int):
    a = ours(tensors, specs, probes)
    b = theirs(convert({k: v.clone() for k, v in tensors.items()}), specs, probes)
    assert a.keys() == b.keys() and len(a) == expect_modules
    for m in a:
        np.testing.assert_allclose(a[m], b[m], rtol=1e-4, atol=1e-5 * np.abs(b[m]).max(), err_msg=m)


def lora(t, stem, out, inp, rank, alpha=None, down="lora_down.weight", up="lora_up.weight"):
    g = torch.Generator().manual_seed(len(t))
    t[f"{stem}.{down}"] = torch.randn(rank, inp, generator=g) / 8
    t[f"{stem}.{up}"] = torch.randn(out, rank, generator=g) / 8
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(float(alpha))


def block_diagonal(t, stem, parts, rank_per_part, alpha):
    """kohya split_qkv: cat of per-part downs, block-diagonal up."""
    g = torch.Generator().manual_seed(len(t))
    t[f"{stem}.lora_down.weight"] = torch.randn(rank_per_part * len(parts), H, generator=g) / 8
    up = torch.zeros(sum(parts), rank_per_part * len(parts))
    row = 0
    for i, n in enumerate(parts):
        up[row : row + n, i * rank_per_part : (i + 1) * rank_per_part] = (
            torch.randn(n, rank_per_part, generator=g) / 8
        )
        row += n
    t[f"{stem}.lora_up.weight"], t[f"{stem}.alpha"] = up, torch.tensor(float(alpha))


KOHYA_MODULES = [  # (BFL name, out, in)
    ("double_blocks.0.img_attn.qkv", 3 * H, H), ("double_blocks.0.img_attn.proj", H, H),
    ("double_blocks.0.img_mlp.0", MLP, H), ("double_blocks.0.img_mlp.2", H, MLP),
    ("double_blocks.0.img_mod.lin", 6 * H, H), ("double_blocks.0.txt_attn.proj", H, H),
    ("double_blocks.0.txt_mlp.0", MLP, H), ("double_blocks.0.txt_mlp.2", H, MLP),
    ("double_blocks.0.txt_mod.lin", 6 * H, H), ("single_blocks.0.linear1", 3 * H + MLP, H),
    ("single_blocks.0.linear2", H, H + MLP), ("single_blocks.0.modulation.lin", 3 * H, H),
    ("img_in", H, 64), ("txt_in", H, 4096), ("time_in.in_layer", H, 256), ("time_in.out_layer", H, H),
    ("vector_in.in_layer", H, 768), ("vector_in.out_layer", H, H),
    ("guidance_in.in_layer", H, 256), ("guidance_in.out_layer", H, H),
]  # fmt: skip


@pytest.mark.parametrize("spelling", ["kohya", "comfyui"])
def test_kohya_matches_diffusers(specs, probes, spelling):
    t = {}
    stem = (
        (lambda n: "lora_unet_" + n.replace(".", "_"))
        if spelling == "kohya"
        else (lambda n: "diffusion_model." + n)
    )
    for i, (name, out, inp) in enumerate(KOHYA_MODULES):
        lora(t, stem(name), out, inp, rank=2, alpha=[1.0, 2.0, 8.0][i % 3])
    block_diagonal(t, stem("double_blocks.0.txt_attn.qkv"), [H] * 3, 1, alpha=3.0)
    block_diagonal(t, stem("single_blocks.1.linear1"), [H] * 3 + [MLP], 1, alpha=2.0)
    # diffusers drops the alpha of final_layer keys (scale 1): give them alpha = rank so both agree
    lora(t, stem("final_layer.linear"), 64, H, rank=2, alpha=2.0)
    lora(t, stem("final_layer.adaLN_modulation.1"), 2 * H, H, rank=2, alpha=2.0)
    compare(t, conversion._convert_kohya_flux_lora_to_diffusers, specs, probes, len(KOHYA_MODULES) + 4)


def test_xlabs_matches_diffusers(specs, probes):
    t = {}
    for stem, out, inp in [
        ("double_blocks.0.processor.qkv_lora1", 3 * H, H), ("double_blocks.0.processor.proj_lora1", H, H),
        ("double_blocks.0.processor.qkv_lora2", 3 * H, H), ("double_blocks.0.processor.proj_lora2", H, H),
        ("single_blocks.0.processor.qkv_lora", 3 * H, H), ("single_blocks.0.processor.proj_lora", H, H + MLP),
    ]:  # fmt: skip
        lora(t, stem, out, inp, rank=2, down="down.weight", up="up.weight")
    compare(t, conversion._convert_xlabs_flux_lora_to_diffusers, specs, probes, 6)


def test_onetrainer_matches_diffusers(specs, probes):
    # diffusers' "mixture" converter handles attention and non-block modules (alpha required)
    t = {}
    for stem, out, inp in [
        ("transformer_blocks_0_attn_to_q", H, H), ("transformer_blocks_0_attn_to_v", H, H),
        ("transformer_blocks_0_attn_add_k_proj", H, H), ("transformer_blocks_0_attn_to_out_0", H, H),
        ("transformer_blocks_0_attn_to_add_out", H, H), ("single_transformer_blocks_0_attn_to_k", H, H),
        ("x_embedder", H, 64), ("context_embedder", H, 4096), ("proj_out", 64, H),
        ("norm_out_linear", 2 * H, H), ("time_text_embed_timestep_embedder_linear_1", H, 256),
        ("time_text_embed_guidance_embedder_linear_2", H, H),
        ("time_text_embed_text_embedder_linear_1", H, 768),
    ]:  # fmt: skip
        lora(t, "lora_transformer_" + stem, out, inp, rank=2, alpha=4.0)
    compare(t, conversion._convert_kohya_flux_lora_to_diffusers, specs, probes, 12)


def test_fal_kontext_matches_diffusers(specs, probes):
    # fal's Kontext trainer: `base_model.model.` + BFL names, PEFT lora_A/B, scale 1; diffusers'
    # converter wants every block of FLUX.1 (19 double, 38 single) and final_layer.linear
    t, p = {}, "base_model.model."
    for i in range(19):
        for side in ("img", "txt"):
            b = f"{p}double_blocks.{i}.{side}"
            for stem, out, inp in [
                (f"{b}_mod.lin", 6 * H, H), (f"{b}_attn.qkv", 3 * H, H), (f"{b}_attn.proj", H, H),
                (f"{b}_mlp.0", MLP, H), (f"{b}_mlp.2", H, MLP),
            ]:  # fmt: skip
                lora(t, stem, out, inp, rank=2, down="lora_A.weight", up="lora_B.weight")
    for i in range(38):
        b = f"{p}single_blocks.{i}"
        for stem, out, inp in [(f"{b}.modulation.lin", 3 * H, H), (f"{b}.linear1", 3 * H + MLP, H),
                               (f"{b}.linear2", H, H + MLP)]:  # fmt: skip
            lora(t, stem, out, inp, rank=2, down="lora_A.weight", up="lora_B.weight")
    lora(t, f"{p}final_layer.linear", 64, H, rank=2, down="lora_A.weight", up="lora_B.weight")
    compare(t, conversion._convert_fal_kontext_lora_to_diffusers, specs, probes, 19 * 10 + 38 * 3 + 1)
