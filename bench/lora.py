"""A random rank-r LoRA on every linear layer of the transformer, applied as a runtime side path.

`flux_1.lora` (the project's own LoRA code: file formats, key resolution, `LoRALinear` side path) is
used when importable: a LoRA file in BFL names is synthesised in memory and applied with
`apply_loras`, exactly as a user's file would be. If it is not importable, `SideLoRALinear` below (a
minimal y = W x + (x A^T) B^T) stands in, and the report says so (`lora_impl`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class SideLoRALinear(nn.Module):
    """Fallback side path: the base linear plus (x @ A^T) @ B^T."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array):
        super().__init__()
        self.base = base
        self.lora_a = a
        self.lora_b = b

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


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
    key = mx.random.key(seed)
    out = {}
    for i, (name, m) in enumerate(sorted(_linears(model).items())):
        n_out, n_in = _shape(m)
        ka, kb = mx.random.split(mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else
                                 mx.random.key(seed * 100003 + i))
        out[name] = (mx.random.normal((rank, n_in), key=ka) * n_in**-0.5,
                     mx.random.normal((n_out, rank), key=kb) * 0.01)
    return out


def apply(model: nn.Module, rank: int, seed: int = 1) -> dict:
    """Put a rank-`rank` LoRA (strength 1) on every linear of `model`. Returns what was done."""
    factors = random_factors(model, rank, seed)
    try:
        from flux_1.lora import LoRA, apply_loras
    except Exception as e:  # noqa: BLE001 - any import problem means: use the fallback
        return _apply_fallback(model, factors, f"bench.lora.SideLoRALinear (flux_1.lora not importable: {e})")
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


def _apply_fallback(model: nn.Module, factors: dict, why: str) -> dict:
    dtype = None
    for name, (down, up) in factors.items():
        parent_name, _, child = name.rpartition(".")
        parent = model
        for part in parent_name.split(".") if parent_name else []:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        base = parent[int(child)] if isinstance(parent, list) else parent[child]
        dtype = base["scales"].dtype if "scales" in base else base["weight"].dtype
        layer = SideLoRALinear(base, down.astype(dtype), up.astype(dtype))
        if isinstance(parent, list):
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
    mx.eval(model.parameters())
    return {"lora_impl": why, "lora_layers": len(factors), "handle": None}


def remove(model: nn.Module, info: dict) -> None:
    """Take the LoRA off again (the base layers come back)."""
    handle = info.get("handle")
    if handle is not None:
        try:
            handle.remove(model)  # LoRAStack.remove(transformer, clip=None, name=None)
        except TypeError:
            handle.clear()
        return
    for name, m in list(model.named_modules()):
        if isinstance(m, SideLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model
            for part in parent_name.split(".") if parent_name else []:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            if isinstance(parent, list):
                parent[int(child)] = m.base
            else:
                setattr(parent, child, m.base)
