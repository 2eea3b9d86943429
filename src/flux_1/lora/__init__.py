"""LoRA, LoKr, LoHa and full-delta adapters for FLUX.1 (transformer) and CLIP: formats and application."""

from .formats import LoRA, LoRAError, Patch, Report, check_tensors, load_lora, resolve_lora
from .layers import LoRALinear, LoRAStack, apply_loras, bake, linear_specs, lora_strengths, norm_specs

__all__ = [
    "LoRA",
    "LoRAError",
    "LoRALinear",
    "LoRAStack",
    "Patch",
    "Report",
    "apply_loras",
    "bake",
    "check_tensors",
    "linear_specs",
    "load_lora",
    "lora_strengths",
    "norm_specs",
    "resolve_lora",
]
