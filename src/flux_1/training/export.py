"""Writing trained adapters as LoRA files other tools load, exactly (no SVD, no re-fitting).

- "peft": diffusers' own layout, `transformer.<diffusers module>.lora_A.weight` (rank, in) and
  `.lora_B.weight` (out, rank), float32, with the `lora_adapter_metadata` header diffusers writes for a
  transformer LoRA (the LoraConfig: r, lora_alpha, target_modules, ...), so `FluxPipeline.load_lora_weights`
  and our `flux_1.lora` both scale it by lora_alpha / r.
- "kohya": BFL module names, `lora_unet_<BFL name, dots as _>.lora_down.weight / .lora_up.weight /
  .alpha`, the layout kohya sd-scripts writes for FLUX and ComfyUI, Forge and our loader read. A fused
  module of ours (qkv, linear1) is one entry: the downs of its projections stacked (P*rank rows), the
  up block-structured (each projection's B in its own rows and columns, zero elsewhere), and alpha =
  scale * P * rank, since every reader scales by alpha / down.shape[0]. The product is the same delta.

Files are written atomically (a temp file in the same folder, then renamed): a failed write (a full
disk) leaves an existing file as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import save as safetensors_bytes

from ..loading.tables import BFL_TRANSFORMER, resolve
from ..pipeline.metadata import write_atomic
from .adapters import AdapterConfig, adapted_layers

FORMATS = ("peft", "kohya")


def _np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float32)


def peft_config(config: AdapterConfig, target_modules: list[str]) -> dict:
    """The LoraConfig fields diffusers stores for a transformer LoRA (`LoraConfig(**this)` is valid)."""
    return {
        "r": config.rank, "lora_alpha": config.alpha, "target_modules": sorted(target_modules),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def bfl_name(module: str) -> str:
    """Our module name -> BFL's (MLX's `.layers.N` of nn.Sequential is BFL's `.N`)."""
    name = module.replace(".layers.", ".")
    if resolve(BFL_TRANSFORMER, name).target != module:  # pragma: no cover (a table change)
        raise ValueError(f"no BFL name for module {module!r}")
    return name


def _check(transformer, config: AdapterConfig):
    layers = adapted_layers(transformer)
    if not layers:
        raise ValueError("this transformer has no LoRA adapters to save: call attach first")
    for name, layer in layers:
        if layer.rank != config.rank or abs(layer.scale - config.scale) > 1e-12 * config.scale:
            raise ValueError(f"{name} has adapters of rank {layer.rank}, scale {layer.scale:g}; the config "
                             f"says rank {config.rank}, alpha {config.alpha:g}")
    return layers


def peft_tensors(transformer, config: AdapterConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, names = {}, []
    for _, layer in _check(transformer, config):
        for p, a, b in zip(layer.projections, layer.lora_A, layer.lora_B, strict=True):
            tensors[f"transformer.{p.name}.lora_A.weight"] = _np(a)
            tensors[f"transformer.{p.name}.lora_B.weight"] = _np(b)
            names.append(p.name)
    packed = {f"transformer.{k}": v for k, v in peft_config(config, names).items()}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def kohya_tensors(transformer, config: AdapterConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors = {}
    for name, layer in _check(transformer, config):
        r, parts = layer.rank, len(layer.projections)
        up = np.zeros((layer.out_features, parts * r), np.float32)
        for i, (p, b) in enumerate(zip(layer.projections, layer.lora_B, strict=True)):
            b = _np(b)
            if p.swap_halves:  # diffusers' rows (a | b) are our (b | a)
                b = np.concatenate(np.split(b, 2)[::-1])
            up[p.row : p.row + p.rows, i * r : (i + 1) * r] = b
        stem = "lora_unet_" + bfl_name(name).replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = np.concatenate([_np(a) for a in layer.lora_A])
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = np.array(layer.scale * parts * r, np.float32)
    return tensors, {"format": "pt", "ss_network_dim": str(config.rank), "ss_network_alpha": str(config.alpha)}


def save_lora(transformer, path, config: AdapterConfig, format: str = "peft", metadata: dict | None = None) -> Path:
    """Write the adapters of `transformer` as a LoRA .safetensors file; returns its path. `metadata`
    (str -> str, other values JSON-encoded) is added to the header; it may not replace our keys."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a .safetensors file name")
    tensors, header = (peft_tensors if format == "peft" else kohya_tensors)(transformer, config)
    for key, value in (metadata or {}).items():
        if key in header:
            raise ValueError(f"metadata key {key!r} is written by save_lora itself")
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes(tensors, metadata=header))
    return path
