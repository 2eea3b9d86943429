"""LoRA, LoKr, LoHa and full-delta adapters for FLUX.1 (transformer) and CLIP: formats and application."""

from .formats import LoRA, LoRAError, Patch, Report, load_lora, resolve_lora
from .layers import LoRALinear, LoRAStack, apply_loras, bake, linear_specs

__all__ = [
    "LoRA",
    "LoRAError",
    "LoRALinear",
    "LoRAStack",
    "Patch",
    "Report",
    "apply_loras",
    "bake",
    "linear_specs",
    "load_lora",
    "resolve_lora",
]
