"""A tiny FLUX.1-schnell folder whose transformer is wide enough that its weights dominate its memory and
that a rank's share of each layer is whole 4-bit groups (hidden 256 = 4 heads x 64, MLP 1024), plus a
LoRA file touching sharded layers of both kinds. Text encoders, VAE and tokenizers are the tiny ones."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import numpy as np

from tests.fixtures import make_tiny_checkpoints as tiny

WIDE = {"FLUX_HEADS": 4, "FLUX_HEAD_DIM": 64, "FLUX_HIDDEN": 256, "FLUX_MLP": 1024, "FLUX_DOUBLE": 1, "FLUX_SINGLE": 2}


def write_wide_flux(root: Path, tiny_folder: Path) -> Path:
    """`tiny_folder` (a diffusers-layout tiny schnell) with the transformer replaced by a wide one."""
    root = Path(root)
    shutil.copytree(tiny_folder, root, ignore=shutil.ignore_patterns("transformer", "flux1-*.safetensors"))
    with mock.patch.multiple(tiny, **WIDE):
        weights = tiny.transformer_weights("schnell", seed=5)
    (root / "transformer").mkdir()
    tiny.write_safetensors(root / "transformer" / "diffusion_pytorch_model.safetensors", weights, "float32")
    return root


def write_lora(path: Path, rank: int = 4) -> Path:
    """A diffusers-format LoRA on the wide model: q/k/v onto the fused qkv (split by rows), the MLP and
    output projections and a modulation (split by columns), the single block's proj_mlp / proj_out."""
    h, mlp = WIDE["FLUX_HIDDEN"], WIDE["FLUX_MLP"]
    rng = np.random.default_rng(7)
    tensors = {}

    def pair(module: str, out: int, inp: int) -> None:
        tensors[f"transformer.{module}.lora_A.weight"] = (rng.standard_normal((rank, inp)) / 4).astype(np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = (rng.standard_normal((out, rank)) / 4).astype(np.float32)

    for n in ("to_q", "to_k", "to_v", "to_out.0", "add_v_proj"):
        pair(f"transformer_blocks.0.attn.{n}", h, h)
    pair("transformer_blocks.0.ff.net.2", h, mlp)
    pair("transformer_blocks.0.norm1.linear", 6 * h, h)
    pair("single_transformer_blocks.1.proj_mlp", mlp, h)
    pair("single_transformer_blocks.1.proj_out", h, h + mlp)
    pair("single_transformer_blocks.0.attn.to_k", h, h)
    tiny.write_safetensors(path, tensors, "float32")
    return path
