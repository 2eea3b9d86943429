"""LoRA / QLoRA fine-tuning of the FLUX transformer: adapters, the flow-matching objective, export."""

from .adapters import AdapterConfig, adapter_state, attach, load_adapter_state, target_modules
from .export import save_lora
from .objective import flow_loss, loss_and_grad, loss_weighting, sample_sigmas

__all__ = [
    "AdapterConfig",
    "adapter_state",
    "attach",
    "flow_loss",
    "load_adapter_state",
    "loss_and_grad",
    "loss_weighting",
    "sample_sigmas",
    "save_lora",
    "target_modules",
]
