"""Which layers are quantized, how, and quantizing while loading. See docs/QUANTIZATION.md.

Policy (the same for runtime `-q` and for save.py; `layer_plan` is the one place it is applied):
- transformer: every linear except `img_in` and `final_layer.linear`, the two layers as wide as the
  packed latent (64): they hold 0.4 MB together (nothing to gain), and they touch every latent value
  directly (the one place an error is not averaged over 3072 channels);
- T5 and CLIP: every linear and the token embeddings (T5's 32128 x 4096 table is 0.26 GB in bf16);
  CLIP's 77-row position table and T5's relative-attention-bias table stay (tiny, and added raw);
- never norms, never the VAE (its convs are 84M parameters, 0.17 GB, and run once per image).
A layer whose input width no allowed group size divides stays in full precision. The per-component
lists (what stays full precision, which embeddings quantize) are in `components.py`.

Settings: MLX affine quantization at 3, 4, 5, 6 or 8 bits (group size 64, or the largest of 128/64/32
that divides a layer's input width), and MLX's microscaling float formats mxfp4, mxfp8 (group 32,
e8m0 scales) and nvfp4 (group 16, e4m3 scales), where the backend at hand runs them
(`supported_modes`).

Quantize while loading: the skeleton is quantized before any weight is read (`quantize_skeleton`), then
the loader hands each full-precision weight to `quantize_on_load` one module at a time, so the
full-precision model never exists: peak memory is the quantized model plus about one layer.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

AFFINE_BITS = (3, 4, 5, 6, 8)
# MLX's microscaling formats have a fixed group size and width.
FIXED_GROUP = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}
MODE_BITS = {"mxfp4": 4, "mxfp8": 8, "nvfp4": 4}
MODES = ("affine", *FIXED_GROUP)
# What `-q` accepts, in the order help texts list it.
CHOICES = tuple(str(b) for b in AFFINE_BITS) + tuple(FIXED_GROUP)
AFFINE_GROUPS = (128, 64, 32)
DEFAULT_GROUP = 64
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    group_size: int = DEFAULT_GROUP
    mode: str = "affine"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise ValueError(f"quantize bits must be one of {AFFINE_BITS}, got {self.bits}")
            if self.group_size not in AFFINE_GROUPS:
                raise ValueError(f"affine group size must be one of {AFFINE_GROUPS}, got {self.group_size}")
        else:
            if self.bits != MODE_BITS[self.mode]:
                raise ValueError(f"{self.mode} is {MODE_BITS[self.mode]}-bit, got bits={self.bits}")
            if self.group_size != FIXED_GROUP[self.mode]:
                raise ValueError(
                    f"{self.mode} has group size {FIXED_GROUP[self.mode]}, got {self.group_size}")

    @classmethod
    def from_mode(cls, mode: str) -> QuantSpec:
        if mode not in FIXED_GROUP:
            raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(FIXED_GROUP)}")
        return cls(bits=MODE_BITS[mode], group_size=FIXED_GROUP[mode], mode=mode)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), mode=str(d.get("mode", "affine")))

    @property
    def label(self) -> str:
        """What `-q` is given to get this spec ("4", "mxfp4")."""
        return str(self.bits) if self.mode == "affine" else self.mode

    @property
    def description(self) -> str:
        """For messages: "4-bit affine (group 64)", "mxfp4"."""
        return f"{self.bits}-bit affine (group {self.group_size})" if self.mode == "affine" else self.mode

    def group_for(self, in_features: int) -> int | None:
        """The requested group size if it divides the input width, else the largest of 128/64/32 that
        does (affine); None when none does (the layer stays full precision)."""
        if self.mode != "affine":
            return self.group_size if in_features % self.group_size == 0 else None
        for g in (self.group_size, *AFFINE_GROUPS):
            if in_features % g == 0:
                return g
        return None

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}


def parse(value: int | str | QuantSpec | None) -> QuantSpec | None:
    """`-q` / `quantize=` -> spec: None (full precision), 3/4/5/6/8 (affine), or a mode name.

    A mode the current backend cannot run is refused here, with the modes it can run.
    """
    if value is None or isinstance(value, QuantSpec):
        return value
    text = str(value).strip().lower()
    if text in ("", "none", "0"):
        return None
    if text.isdigit():
        if int(text) not in AFFINE_BITS:
            raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, got {value!r}")
        return QuantSpec(bits=int(text))
    if text not in FIXED_GROUP:
        raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, got {value!r}")
    spec = QuantSpec.from_mode(text)
    check_supported(spec)
    return spec


@functools.cache
def _mode_runs(mode: str, device: str) -> bool:
    spec = QuantSpec.from_mode(mode) if mode != "affine" else QuantSpec(bits=4)
    try:
        w = mx.random.normal((64, 128), key=mx.random.key(0))
        out = mx.quantize(w, spec.group_size, spec.bits, mode=mode)
        wq, scales, biases = out[0], out[1], out[2] if len(out) > 2 else None
        y = mx.quantized_matmul(mx.ones((2, 128)), wq, scales, biases, transpose=True,
                                group_size=spec.group_size, bits=spec.bits, mode=mode)
        rows = mx.dequantize(wq, scales, biases, group_size=spec.group_size, bits=spec.bits, mode=mode)
        mx.eval(y, rows)
        return bool(mx.all(mx.isfinite(y)).item())
    except Exception:  # an unsupported mode raises from the backend with its own wording
        return False


def supported_modes() -> tuple[str, ...]:
    """The quantization modes that run (quantize, matmul, dequantize) on the default device."""
    device = str(mx.default_device())
    return tuple(m for m in MODES if _mode_runs(m, device))


def check_supported(spec: QuantSpec) -> None:
    if spec.mode not in supported_modes():
        raise ValueError(
            f"{spec.mode} quantization does not run on this backend ({mx.default_device()}, "
            f"mlx {mx.__version__}); available here: {', '.join(supported_modes())}"
        )


# ------------------------------------------------------------------------------------------------
# The plan: which layers, how


def layer_plan(model: nn.Module, component: str, spec: QuantSpec | None) -> dict[str, dict]:
    """{module name: {group_size, bits, mode}} for each layer the policy quantizes."""
    from .components import component as find_component

    facts = find_component(component)
    if spec is None or not facts.quantizable:
        return {}
    keep, embeddings = facts.keep_full_precision, facts.quantized_embeddings
    plan = {}
    for name, module in model.named_modules():
        if name in keep:
            continue
        if isinstance(module, nn.Embedding):
            if name not in embeddings:
                continue
        elif not isinstance(module, nn.Linear):
            continue
        group = spec.group_for(module.weight.shape[1])
        if group is not None:
            plan[name] = {"group_size": group, "bits": spec.bits, "mode": spec.mode}
    return plan


def plan_spec(plan: dict[str, dict]) -> QuantSpec | None:
    """The spec a plan was made with: the bits and mode its layers share, the most common group size
    (None for an empty plan). Layers may differ only in group size (the fallback for narrow inputs)."""
    if not plan:
        return None
    kinds = {(p["bits"], p.get("mode", "affine")) for p in plan.values()}
    if len(kinds) != 1:
        raise ValueError(f"layers are quantized in more than one way: {sorted(kinds)}")
    bits, mode = kinds.pop()
    groups = [p["group_size"] for p in plan.values()]
    group = max(set(groups), key=groups.count) if mode == "affine" else FIXED_GROUP[mode]
    return QuantSpec(bits=bits, group_size=group, mode=mode)


def is_mixed(plan: dict[str, dict]) -> bool:
    """Whether a plan's layers differ in bits or mode (a GGUF's per-tensor types, saved as such); such a
    plan has no single spec (`plan_spec` refuses it): describe it with `plan_summary`."""
    return len({(p["bits"], p.get("mode", "affine")) for p in plan.values()}) > 1


def setting_label(how: dict) -> str:
    """One layer's MLX setting: "4-bit affine (group 32)", "mxfp4"."""
    mode = how.get("mode", "affine")
    return f"{how['bits']}-bit affine (group {how['group_size']})" if mode == "affine" else mode


def plan_summary(plan: dict[str, dict]) -> dict[str, int]:
    """{MLX setting: number of layers}, most common first: the mix of a per-layer plan."""
    counts: dict[str, int] = {}
    for how in plan.values():
        counts[setting_label(how)] = counts.get(setting_label(how), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _check_plan(model: nn.Module, plan: dict[str, dict]) -> None:
    modules = dict(model.named_modules())
    bad = [n for n in plan if not isinstance(modules.get(n), (nn.Linear, nn.Embedding, *QUANTIZED))]
    if bad:
        raise ValueError(f"the quantization plan names layers that are not linears or embeddings of "
                         f"this model: {bad[:8]}{' ...' if len(bad) > 8 else ''}")


# Rows (tokens) up to which MLX's fused CPU `quantized_matmul` beats dequantize-then-GEMM, by (mode, bits).
# The fused CPU kernel costs a fixed time per row (3072x3072 weight: ~6 ms per row affine, ~2.5 ms mxfp4 /
# nvfp4, ~12 ms mxfp8), dequantizing the whole weight a fixed time per call (4-bit affine through
# `planar_matmul` ~3 ms, so it wins from one row: 4.6-5.0 against 6.0 ms; 8-bit affine ~4 ms, 5.3-5.8
# against 6.0-6.2 ms at one row; other affine widths through MLX's dequantize ~32 ms; ~70-85 ms mxfp4 /
# nvfp4, ~24 ms mxfp8);
# measured crossovers on a 2-core EPYC, mlx 0.32.4 (`python -m bench.cpu_speed --only quantized_rows`,
# BENCHMARKS.md). The modulation layers (one row per image) are where few rows occur.
FUSED_MAX_ROWS = {("affine", 3): 4, ("affine", 4): 0, ("affine", 5): 4, ("affine", 6): 4, ("affine", 8): 0,
                  ("mxfp4", 4): 16, ("nvfp4", 4): 16, ("mxfp8", 8): 1}


class _CacheBudget:
    """Bytes that dequantized weights may hold resident on the CPU backend, over all layers (0: none).

    `-q` promises quantized weights resident; a cached float copy breaks that promise, so only an
    explicit `set_dequantized_cache(bytes)` allows it, and never beyond the given bytes."""

    def __init__(self):
        self.limit = 0
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def room(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes


_budget = _CacheBudget()


def set_dequantized_cache(limit_bytes: int) -> None:
    """Allow the CPU path of `QuantizedLinear` to keep up to `limit_bytes` of dequantized weights resident
    (first come, first cached; 0, the default, caches nothing). Lowering the limit frees nothing already
    cached: `drop_dequantized(model)` does."""
    if limit_bytes < 0:
        raise ValueError(f"the dequantized-weight cache limit must be >= 0 bytes, got {limit_bytes}")
    _budget.limit = int(limit_bytes)


def dequantized_cache_bytes() -> int:
    """Bytes the dequantized weights cached now hold."""
    return _budget.used


def drop_dequantized(model: nn.Module) -> None:
    """Free the dequantized weights a model's layers cached (their bytes return to the budget)."""
    for _, m in model.named_modules():
        if getattr(m, "_dequantized", None) is not None:
            m._dequantized = None


class _Dequantized:
    """One layer's cached float weight and the codes it came from (a new weight invalidates it). A plain
    object, not an array attribute, so it is never a parameter (never saved, never trained)."""

    def __init__(self, codes: mx.array, weight: mx.array):
        self.codes, self.weight = codes, weight
        weakref.finalize(self, _budget.give_back, weight.nbytes)


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear, plus a CPU path. MLX's fused CPU `quantized_matmul` has no fast kernel (its
    time grows by ~6 ms per row at 3072x3072), so per call: up to `FUSED_MAX_ROWS` rows (the modulation
    layers, one row per image) it is used; above, the weight is dequantized (one layer at a time, freed
    after use) and multiplied with the float GEMM (53x faster than the fused kernel at 1024 rows; 4-bit
    affine codes through `planar_matmul`, the rest through `dequantize`), or the cached dequantized weight
    is used where `set_dequantized_cache` allows it. All give the same numbers within float32 rounding,
    and all are differentiable w.r.t. the input. GPUs keep the fused kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        # Written for `self` being any module with a quantized layer's arrays and attributes: a LoRA
        # wrapper calls this on itself (lora/layers.py), so no super() and no class-level state.
        rows = x.size // x.shape[-1]
        if mx.default_device() != mx.cpu or rows <= FUSED_MAX_ROWS.get((self.mode, self.bits), 0):
            return nn.QuantizedLinear.__call__(self, x)
        if planar(self["weight"], self.bits, self.mode, self.get("biases")) and not _cacheable(self, x.dtype):
            y = planar_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        else:
            y = x @ _float_weight(self, x.dtype).T
        return y + self["bias"] if "bias" in self else y


_NIBBLE_SHIFTS = mx.array([0, 4], dtype=mx.uint8)


@mx.compile
def _affine_from_bytes(codes: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    # codes: the packed words viewed as bytes, (O, I*bits/8). Byte k holds elements 2k (low nibble) and
    # 2k+1 (high nibble) at 4 bits, element k at 8 (MLX packs little-endian from the lowest bits).
    q = (codes[..., None] >> _NIBBLE_SHIFTS) & 15 if bits == 4 else codes
    q = q.reshape(scales.shape[0], scales.shape[1], -1)  # (O, groups, group_size)
    w = q.astype(mx.float32) * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return w.reshape(scales.shape[0], -1).astype(scales.dtype)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
               mode: str = "affine") -> mx.array:
    """`mx.dequantize`; on the CPU, affine 4- and 8-bit codes are unpacked by one compiled pass of MLX
    arithmetic instead, 1.6-1.7x faster than MLX's CPU kernel (which is single-threaded and scalar:
    (21504, 3072) 116 -> 68 ms). Bitwise equal to `mx.dequantize` for float32 scales; for bfloat16 or
    float16 scales it rounds `scale * q + bias` once, in float32, where MLX rounds twice in that dtype."""
    if (mx.default_device() == mx.cpu and mode == "affine" and bits in (4, 8) and biases is not None
            and w.dtype == mx.uint32 and w.ndim == 2):
        return _affine_from_bytes(mx.view(w, mx.uint8), scales, biases, bits)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


@mx.compile
def _planes(codes: mx.array, scales: mx.array, biases: mx.array, bits: int) -> list[mx.array]:
    # codes: (O, P, G) bytes, byte p of each of the G groups in a row (P = group_size * bits / 8);
    # scales, biases: (O, 1, G). Plane j (of 8 / bits): element p * (8 / bits) + j of every group.
    # Groups run along the innermost axis, so MLX's CPU kernel streams codes, scales and output alike
    # (in the row layout the scale is broadcast along the innermost axis: ~3x slower).
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    mask = (1 << bits) - 1
    return [((codes >> (bits * j)) & mask).astype(mx.float32) * s + b for j in range(8 // bits)]


def planar(w: mx.array, bits: int, mode: str, biases: mx.array | None) -> bool:
    """Whether `planar_matmul` takes these codes (affine, 4-bit, 2-D packed words)."""
    return mode == "affine" and bits == 4 and biases is not None and w.dtype == mx.uint32 and w.ndim == 2


def planar_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                  transpose: bool = True) -> mx.array:
    """`x @ dequantize(w).T` (`transpose`) or `x @ dequantize(w)` for 4-bit affine codes, on the CPU.

    The weight is dequantized in a column order where each group's scale is constant along the slow
    axes (`_planes`: (O, I/2) bytes -> 2 float planes (O, I/2), low nibbles and high nibbles, each ordered
    (position in group, group)), and the input's columns are put in the same order (a copy of x, small
    next to the weight at any batch the float GEMM is chosen for), so the product is the same sum in
    another order: equal within float32 rounding. (512, 3072) x (3072, 3072): 27 ms against 33 for
    dequantize-then-GEMM and 23 for the float GEMM alone (2-core EPYC, BENCHMARKS.md). Differentiable
    w.r.t. x."""
    out_rows, packed = w.shape
    groups = scales.shape[-1]
    per_byte = 8 // bits
    per_group = group_size // per_byte  # bytes per group
    # One transposing copy of the bytes first: MLX's compiled CPU kernel reads a transposed view ~1.5x
    # slower than it copies it.
    codes = mx.contiguous(mx.view(w, mx.uint8).reshape(out_rows, groups, per_group).transpose(0, 2, 1))
    planes = [p.reshape(out_rows, -1) for p in _planes(codes, scales[:, None, :], biases[:, None, :], bits)]
    if x.dtype != mx.float32:
        planes = [p.astype(x.dtype) for p in planes]
    lead = x.shape[:-1]
    if transpose:  # (..., I) -> (..., O)
        # x columns g * group_size + p * per_byte + j -> plane j's order (p, g)
        xr = x.reshape(-1, groups, per_group, per_byte)
        y = None
        for j, plane in enumerate(planes):
            xj = xr[..., j].transpose(0, 2, 1).reshape(xr.shape[0], -1)
            y = xj @ plane.T if y is None else mx.addmm(y, xj, plane.T)  # the GEMM accumulates
        return y.reshape(*lead, out_rows)
    # (..., O) -> (..., I): plane j gives the input columns of its order (p, g); interleave them back
    x2 = x.reshape(-1, out_rows)
    parts = [(x2 @ plane).reshape(-1, per_group, groups) for plane in planes]
    return mx.stack(parts, axis=-1).transpose(0, 2, 1, 3).reshape(*lead, groups * group_size)


def _cached_weight(layer: nn.Module, dtype: mx.Dtype) -> mx.array | None:
    """The layer's cached float weight in `dtype`, if it holds one of its current codes."""
    cached = getattr(layer, "_dequantized", None)
    if cached is not None and cached.codes is layer["weight"] and cached.weight.dtype == dtype:
        return cached.weight
    return None


def _cacheable(layer: nn.Module, dtype: mx.Dtype) -> bool:
    """Whether `_float_weight` would use or keep a float copy of this layer (cached now, or room for it)."""
    out_rows, packed = layer["weight"].shape
    return (_cached_weight(layer, dtype) is not None
            or _budget.room(out_rows * packed * 32 // layer.bits * dtype.size))


def _float_weight(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """A quantized layer's weight in `dtype`: its cached copy if it holds a current one, else dequantized
    now (and cached if the budget has room)."""
    cached = _cached_weight(layer, dtype)
    if cached is not None:
        return cached
    w = dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                   bits=layer.bits, mode=layer.mode).astype(dtype)
    layer._dequantized = None  # a stale copy goes back to the budget before a new one is taken
    if _budget.take(w.nbytes):
        layer._dequantized = _Dequantized(layer["weight"], w)
    return w


def to_quantized(module: nn.Module, how: dict) -> nn.Module:
    """The quantized version of one planned layer (ours for linears, MLX's for embeddings)."""
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_linear(module, **how)
    return module.to_quantized(**how)


def quantize_skeleton(model: nn.Module, plan: dict[str, dict]) -> None:
    """Swap the planned layers for quantized ones before any weight is loaded.

    The skeleton's random weights are lazy and never evaluated: loading replaces them.
    """
    if not plan:
        return
    _check_plan(model, plan)
    swaps = [(name, to_quantized(m, plan[name])) for name, m in model.named_modules()
             if name in plan and not isinstance(m, QUANTIZED)]
    model.update_modules(tree_unflatten(swaps))


def quantize_on_load(module_name: str, weight: mx.array, module: nn.Module, dtype: mx.Dtype) -> dict:
    """Turn an incoming weight into the module's parameters: quantize full-precision weights for
    quantized layers (one layer at a time, so no second full copy exists), pass codes through."""
    if not isinstance(module, QUANTIZED) or weight.dtype == mx.uint32:
        return {"weight": weight}
    out = mx.quantize(weight.astype(dtype), group_size=module.group_size, bits=module.bits, mode=module.mode)
    names = ("weight", "scales", "biases")
    return {n: a for n, a in zip(names, out, strict=False) if a is not None}


def quantize_loaded(model: nn.Module, plan: dict[str, dict]) -> None:
    """Quantize an already-loaded full-precision model in place, one layer at a time.

    Each layer is quantized and evaluated before the next, and its full-precision weight is dropped
    (unless something else holds it), so memory does not grow to full precision + quantized.
    """
    _check_plan(model, plan)
    modules = {name: m for name, m in model.named_modules() if name in plan}
    for name, how in plan.items():
        module = modules.pop(name)  # no reference to the full-precision layer outlives its turn
        if isinstance(module, QUANTIZED):
            continue
        quantized = to_quantized(module, how)
        mx.eval(quantized.parameters())
        model.update_modules(tree_unflatten([(name, quantized)]))
        del module, quantized


def describe(model: nn.Module) -> dict[str, dict]:
    """{module name: {group_size, bits, mode}} of the quantized layers of a loaded model."""
    return {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZED)
    }


def logical_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """The (rows, input width) of a weight from its packed uint32 codes (32 / bits values per word)."""
    return (*shape[:-1], shape[-1] * 32 // bits)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (codes, scales, biases and full-precision tensors): shapes only, the
    arrays are not evaluated."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
