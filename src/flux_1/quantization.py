"""Which layers are quantized, how, and quantizing while loading.

Policy (the same for runtime `-q` and for save.py):
- transformer: every linear except `img_in` and `final_layer.linear`, the two layers as wide as the
  packed latent (64): they hold 0.4 MB together, and they touch every latent value directly;
- T5 and CLIP: every linear and the token embeddings (T5's 32128 x 4096 table is 0.5 GB in bf16);
  CLIP's 77-row position table and T5's relative-attention-bias table stay (tiny, and added raw);
- never norms, never the VAE (its convs are 84M parameters and run once per image).
A layer whose input width no allowed group size divides stays in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
# MLX's microscaling formats have a fixed group size.
FIXED_GROUP = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}
MODES = ("affine", *FIXED_GROUP)
MODE_BITS = {"mxfp4": 4, "mxfp8": 8, "nvfp4": 4}
KEEP_FULL_PRECISION = {
    "transformer": ("img_in", "final_layer.linear"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
    "clip": ("embeddings.position_embedding",),
    "vae": (),
}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "affine" and self.bits not in AFFINE_BITS:
            raise ValueError(f"quantize bits must be one of {AFFINE_BITS}, got {self.bits}")
        if self.mode != "affine" and self.bits != MODE_BITS[self.mode]:
            raise ValueError(f"{self.mode} is {MODE_BITS[self.mode]}-bit, got bits={self.bits}")

    @classmethod
    def from_mode(cls, mode: str) -> QuantSpec:
        return cls(bits=MODE_BITS[mode], group_size=FIXED_GROUP[mode], mode=mode)

    def group_for(self, in_features: int) -> int | None:
        """The requested group size if it divides the input width, else the largest of 128/64/32 that
        does (affine); None when none does (the layer stays full precision)."""
        if self.mode != "affine":
            return self.group_size if in_features % self.group_size == 0 else None
        for g in (self.group_size, 128, 64, 32):
            if in_features % g == 0:
                return g
        return None

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}


def layer_plan(model: nn.Module, component: str, spec: QuantSpec) -> dict[str, dict]:
    """{module name: {group_size, bits, mode}} for each layer the policy quantizes."""
    if component == "vae":
        return {}
    keep = KEEP_FULL_PRECISION[component]
    plan = {}
    for name, module in model.named_modules():
        if name in keep or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if isinstance(module, nn.Embedding) and not name.endswith(("shared", "token_embedding")):
            continue
        group = spec.group_for(module.weight.shape[1])
        if group is not None:
            plan[name] = {"group_size": group, "bits": spec.bits, "mode": spec.mode}
    return plan


def quantize_skeleton(model: nn.Module, plan: dict[str, dict]) -> None:
    """Swap the planned layers for quantized ones before any weight is loaded.

    The skeleton's random weights are lazy and never evaluated: loading replaces them.
    """
    if plan:
        nn.quantize(model, class_predicate=lambda name, _: plan.get(name, False))


def quantize_on_load(module_name: str, weight: mx.array, module: nn.Module, dtype: mx.Dtype) -> dict:
    """Turn an incoming weight into the module's parameters: quantize full-precision weights for
    quantized layers (one layer at a time, so no second full copy exists), pass codes through."""
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or weight.dtype == mx.uint32:
        return {"weight": weight}
    out = mx.quantize(weight.astype(dtype), group_size=module.group_size, bits=module.bits, mode=module.mode)
    names = ("weight", "scales", "biases")
    return {n: a for n, a in zip(names, out) if a is not None}


def describe(model: nn.Module) -> dict[str, dict]:
    """{module name: {group_size, bits, mode}} of the quantized layers of a loaded model."""
    return {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
