"""A random rank-r LoRA on every linear layer of the transformer, applied as a runtime side path.

A LoRA file in BFL names is synthesised in memory and applied with `flux_1.lora.apply_loras`, exactly
as a user's file would be (key resolution, `LoRALinear` side path).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from flux_1.lora import LoRA, apply_loras


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}


def _shape(m: nn.Module) -> tuple[int, int]:
    out, cols = m["weight"].shape
    return (out, cols * 32 // m.bits) if "scales" in m else (out, cols)


def _bfl_name(ours: str) -> str:
    """Our module name as a BFL checkpoint spells it (MLX Sequential `.layers.N` -> `.N`)."""
    return ours.replace("_mlp.layers.", "_mlp.").replace("adaLN_modulation.layers.", "adaLN_modulation.")


def random_factors(model: nn.Module, rank: int, seed: int = 1) -> dict[str, tuple[mx.array, mx.array]]:
    """{our module name: (down (r, in), up (out, r))}, float32, for every linear of the model."""
    out = {}
    for i, (name, m) in enumerate(sorted(_linears(model).items())):
        n_out, n_in = _shape(m)
        ka, kb = mx.random.split(mx.random.key(seed * 100003 + i))
        out[name] = (mx.random.normal((rank, n_in), key=ka) * n_in**-0.5,
                     mx.random.normal((n_out, rank), key=kb) * 0.01)
    return out


def apply(model: nn.Module, rank: int, seed: int = 1) -> dict:
    """Put a rank-`rank` LoRA (strength 1) on every linear of `model`. Returns what was done."""
    factors = random_factors(model, rank, seed)
    tensors = {}
    for name, (down, up) in factors.items():
        stem = f"diffusion_model.{_bfl_name(name)}"
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = mx.array(float(rank))
    lora = LoRA(f"bench-rank{rank}", tensors)
    stack = apply_loras(model, [lora], [1.0])
    wrapped = sum(1 for _, m in model.named_modules() if type(m).__name__ == "LoRALinear")
    if wrapped != len(factors):
        raise RuntimeError(f"synthetic LoRA wrapped {wrapped} of {len(factors)} linears")
    return {"lora_impl": "flux_1.lora (LoRALinear side path, unmerged)", "lora_layers": wrapped,
            "handle": stack}


def remove(model: nn.Module, info: dict) -> None:
    """Take the LoRA off again (the base layers come back)."""
    info["handle"].remove(model)
