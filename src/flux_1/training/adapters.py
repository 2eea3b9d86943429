"""Trainable LoRA adapters on a frozen FLUX transformer, one A/B pair per *diffusers* projection.

Our transformer keeps BFL's fused modules (`qkv` = to_q | to_k | to_v rows, a single block's `linear1`
= to_q | to_k | to_v | proj_mlp rows). PEFT trains diffusers' unfused projections, so each fused
linear gets one pair per projection it holds, written onto its row block:

    y = base(x) + scale * concat_p[(x @ A_p.T) @ B_p.T]     (rows of projections not adapted: 0)

with scale = alpha / rank (PEFT's default, not rsLoRA). Export to the PEFT layout is then a copy of
the factors (no SVD). The side path runs in float32 as PEFT does with a bf16/fp16 base (it casts x to
the factors' dtype, adds in float32, casts the sum back to the base's output dtype); the base runs in
its own dtype, quantized layers included, and its arrays are never written.

QLoRA: every quantized layer (adapted or not) becomes a `FrozenLinear` whose backward computes only the
input gradient, re-dequantizing its weight then (CPU) or using the fused kernel (GPU); otherwise the
float copy each CPU forward dequantizes would be kept for the backward, the whole base in float32 at
once. `detach` puts the original layers back.

Target sets (diffusers module names; `target_modules` lists them):
- "attention": PEFT's target_modules ["to_k", "to_q", "to_v", "to_out.0"], the default of diffusers'
  QLoRA research project (flux_lora_quantization) and of train_dreambooth_lora_flux.py before
  `--lora_layers`: the image stream's q/k/v/out in double blocks and q/k/v in single blocks.
- "all": every linear inside the blocks (attention, MLPs, modulation), as kohya sd-scripts and
  ai-toolkit train FLUX by default; the embedders and the final layer stay frozen.
- anything else: a regex matched in full against the diffusers module names.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .. import quantization
from ..loading.tables import DIFFUSERS_TRANSFORMER, part_rows, source_names
from ..lora.layers import LoRALinear, logical_shape, set_module

TARGET_SETS = ("attention", "all")
ATTENTION_SUFFIXES = ("to_k", "to_q", "to_v", "to_out.0")  # PEFT suffix match, as diffusers' QLoRA script
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"  # "attention" | "all" | a regex matched in full against diffusers names

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRA targets must be 'attention', 'all' or a regex, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Projection:
    """One diffusers projection held by a linear of ours: its rows there, and whether its halves swap."""

    name: str  # diffusers module name, e.g. transformer_blocks.0.attn.to_q
    row: int
    rows: int
    swap_halves: bool = False


class FrozenLinear(nn.Module):
    """A frozen linear (nn.Linear or nn.QuantizedLinear, any dtype). The base layer's arrays are this
    module's own parameters under the same names (a saved model or `input_channels` see the base layer),
    frozen. A quantized base is differentiated w.r.t. its input only, without keeping a float copy of its
    weight for the backward (`_input_grad_only`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        for k, v in base.items():
            self[k] = v
        if isinstance(base, nn.QuantizedLinear):
            self.group_size, self.bits, self.mode = base.group_size, base.bits, base.mode
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_base_keys", list(base.keys()))
        object.__setattr__(self, "out_features", logical_shape(base)[0])
        object.__setattr__(self, "_forward", _input_grad_only(base) if "scales" in base else base)
        self.freeze(recurse=False, keys=list(base.keys()))

    def __call__(self, x: mx.array) -> mx.array:
        base = self._base
        for k in self._base_keys:  # the base layer's own forward (and caches) on this module's arrays
            base[k] = self[k]
        return self._forward(x)

    def unwrap(self) -> nn.Module:
        """The base layer, with this module's arrays."""
        for k in self._base_keys:
            self._base[k] = self[k]
        return self._base


class AdaptedLinear(FrozenLinear):
    """A frozen linear plus trainable LoRA pairs: `lora_A[i]` (rank, in) and `lora_B[i]` (rows_i, rank),
    float32, are the pair of `projections[i]`."""

    def __init__(self, base: nn.Module, projections: list[Projection], rank: int, scale: float, key: mx.array):
        super().__init__(base)
        object.__setattr__(self, "projections", list(projections))
        self.scale = scale
        in_features = logical_shape(base)[1]
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on (rank, in), as PEFT
        keys = mx.random.split(key, len(projections))
        self.lora_A = [mx.random.uniform(-bound, bound, (rank, in_features), key=k) for k in keys]
        self.lora_B = [mx.zeros((p.rows, rank), dtype=mx.float32) for p in projections]

    @property
    def rank(self) -> int:
        return self.lora_A[0].shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        r = self.rank
        h = x.astype(mx.float32) @ mx.concatenate(self.lora_A, axis=0).T  # (..., parts * rank)
        pieces, row = [], 0
        for i, p in enumerate(self.projections):
            if p.row > row:
                pieces.append(mx.zeros((*h.shape[:-1], p.row - row), dtype=mx.float32))
            up = h[..., i * r : (i + 1) * r] @ self.lora_B[i].T
            if p.swap_halves:  # the diffusers rows are (a | b) where ours are (b | a)
                up = mx.concatenate(mx.split(up, 2, axis=-1)[::-1], axis=-1)
            pieces.append(up)
            row = p.row + p.rows
        if row < self.out_features:
            pieces.append(mx.zeros((*h.shape[:-1], self.out_features - row), dtype=mx.float32))
        side = (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)) * self.scale
        return (y.astype(mx.float32) + side).astype(y.dtype)


def _input_grad_only(base: nn.Module):
    """x -> base(x) for a frozen quantized layer, differentiable w.r.t. x only, with a backward that
    re-dequantizes the weight (CPU: transiently, one layer at a time) or uses the fused kernel (GPU).
    Without it, autodiff keeps the float copy every CPU forward dequantizes until the backward reaches
    that layer: the whole base in float32, in memory at once, and QLoRA would save nothing."""

    @mx.custom_function
    def forward(x):
        return base(x)

    @forward.vjp
    def backward(primals, cotangent, output):
        w, scales, biases = base["weight"], base["scales"], base.get("biases")
        how = dict(group_size=base.group_size, bits=base.bits, mode=base.mode)
        if mx.default_device() == mx.cpu:
            if quantization.planar(w, base.bits, base.mode, biases):
                return (quantization.planar_matmul(cotangent, w, scales, biases, base.group_size, base.bits,
                                                   transpose=False),)
            return (cotangent @ quantization.dequantize(w, scales, biases, **how).astype(cotangent.dtype),)
        return (mx.quantized_matmul(cotangent, w, scales, biases, transpose=False, **how),)

    return forward


def _linears(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.Linear, nn.QuantizedLinear, FrozenLinear)
    return sorted(((name, m) for name, m in transformer.named_modules() if isinstance(m, kinds)),
                  key=lambda nm: _model_order(nm[0]))


def _model_order(name: str) -> tuple:
    """Sort key: double blocks before single blocks, block 2 before block 10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _projections(module: str, layer: nn.Module) -> list[Projection]:
    """Every diffusers projection of one linear of ours, in row order."""
    names = source_names(DIFFUSERS_TRANSFORMER, module)
    if not names:
        return []
    out, inp = logical_shape(layer)
    rows = part_rows(module, out, inp, names[0][1].parts)
    return [Projection(n, sum(rows[: r.part]), rows[r.part], r.swap_halves) for n, r in names]


def _selector(targets: str):
    if targets == "attention":
        return lambda n: n.startswith(BLOCK_PREFIXES) and any(
            n.endswith("." + s) for s in ATTENTION_SUFFIXES)
    if targets == "all":
        return lambda n: n.startswith(BLOCK_PREFIXES)
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"LoRA targets {targets!r} is not a valid regex ({e})") from None
    return lambda n: pattern.fullmatch(n) is not None


def _plan(transformer: nn.Module, targets: str) -> list[tuple[str, nn.Module, list[Projection]]]:
    selected = _selector(targets)
    plan = []
    for module, layer in _linears(transformer):
        chosen = [p for p in _projections(module, layer) if selected(p.name)]
        if chosen:
            plan.append((module, layer, chosen))
    if not plan:
        raise ValueError(f"LoRA targets {targets!r} match no linear module of the transformer (diffusers "
                         "names such as transformer_blocks.0.attn.to_q)")
    return plan


def target_modules(transformer: nn.Module, targets: str) -> list[str]:
    """The diffusers module names that `attach` adapts for these targets, in model order."""
    return [p.name for _, _, chosen in _plan(transformer, targets) for p in chosen]


def adapted_layers(transformer: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    """(our module name, layer) of every adapted linear, in model order."""
    return [(name, m) for name, m in _linears(transformer) if isinstance(m, AdaptedLinear)]


def attach(transformer: nn.Module, config: AdapterConfig, seed: int = 0) -> list[str]:
    """Freeze the transformer and give the targeted linears trainable LoRA pairs (PEFT's init: A
    kaiming-uniform, B zeros, from `seed`). Returns the diffusers module names adapted."""
    if any(isinstance(m, FrozenLinear) for _, m in _linears(transformer)):
        raise ValueError("this transformer already has LoRA adapters attached")
    if any(isinstance(m, LoRALinear) for _, m in transformer.named_modules()):
        raise ValueError("this transformer has LoRAs applied: bake them in (flux_1.lora.bake) or remove them "
                         "before attaching training adapters")
    plan = _plan(transformer, config.targets)
    transformer.freeze()
    keys = mx.random.split(mx.random.key(seed), len(plan))
    for (module, layer, chosen), key in zip(plan, keys, strict=True):
        set_module(transformer, module, AdaptedLinear(layer, chosen, config.rank, config.scale, key))
    for module, layer in _linears(transformer):  # the other quantized layers: no float copy kept either
        if "scales" in layer and not isinstance(layer, FrozenLinear):
            set_module(transformer, module, FrozenLinear(layer))
    mx.eval(transformer.trainable_parameters())
    return [p.name for _, _, chosen in plan for p in chosen]


def detach(transformer: nn.Module) -> None:
    """Put the base layers back (the adapters are dropped); the transformer stays frozen."""
    for name, layer in _linears(transformer):
        if isinstance(layer, FrozenLinear):
            set_module(transformer, name, layer.unwrap())


def adapter_state(transformer: nn.Module) -> dict[str, mx.array]:
    """The trainable factors by flat parameter name (`double_blocks.0.img_attn.qkv.lora_A.0`), the
    same names as in `transformer.trainable_parameters()` and its gradients after `attach`."""
    state = {}
    for module, layer in adapted_layers(transformer):
        for factor in ("lora_A", "lora_B"):
            state.update({f"{module}.{factor}.{i}": x for i, x in enumerate(layer[factor])})
    return state


def load_adapter_state(transformer: nn.Module, state: dict[str, mx.array]) -> None:
    """Set the factors from `adapter_state`'s output. Strict: a missing or unexpected key, or a shape
    that differs, is a ValueError naming it; nothing changes then."""
    own = adapter_state(transformer)
    if not own:
        raise ValueError("this transformer has no LoRA adapters attached: call attach first")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise ValueError(f"adapter state is missing {len(missing)} key(s), first {missing[0]!r}")
    if unexpected:
        raise ValueError(f"adapter state has {len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"adapter state key {key!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)}")
    transformer.update(tree_unflatten([(k, mx.array(v).astype(mx.float32)) for k, v in state.items()]))
    mx.eval(transformer.trainable_parameters())


def peft_factors(transformer: nn.Module) -> dict[str, tuple[mx.array, mx.array, float]]:
    """diffusers module name -> (lora_A (rank, in), lora_B (out, rank), scale) of every adapter."""
    out = {}
    for _, layer in adapted_layers(transformer):
        for p, a, b in zip(layer.projections, layer.lora_A, layer.lora_B, strict=True):
            out[p.name] = (a, b, layer.scale)
    return out
