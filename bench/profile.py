"""Where a forward's time goes: record its linear and attention calls, time them in isolation.

MLX is lazy, so calling a model without `mx.eval` builds the graph and runs nothing: `record` uses this
to list every linear layer call (module, input shape) and attention call of a forward (for any model
size, the full FLUX.1 included), which gives the exact matmul and attention FLOPs of a step from the
shapes the code really uses. `probe_*` then time each distinct call on random inputs of the same shape:

- step time = graph building (Python) + linears + attention + the rest (norms, modulation, RoPE,
  GELU, residuals, concatenations: elementwise and copy work);
- a quantized setting whose step would take too long on this machine (MLX's CPU quantized matmul is
  about 100x slower than the float32 BLAS GEMM) is *projected*: its unquantized step, minus the
  unquantized linears, plus the quantized linears. Quantized linears are timed on a sample of rows
  (their CPU cost is linear in the rows) and scaled to the real row count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from flux_1.models import transformer as transformer_module


@dataclass
class Calls:
    linears: list[tuple[nn.Module, tuple[int, ...]]] = field(default_factory=list)
    attention: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (q shape, cos shape)
    activations: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # tanh-GELU inputs

    def linear_flops(self) -> float:
        total = 0.0
        for m, shape in self.linears:
            rows = math.prod(shape[:-1])
            out, inp = logical_shape(m)
            total += 2.0 * rows * inp * out
            side = getattr(m, "_side", None)
            a = getattr(side, "a", None) if side is not None else getattr(m, "lora_a", None)
            if a is not None:
                total += 2.0 * rows * a.shape[0] * (inp + out)
        return total

    def attention_flops(self) -> float:
        # QK^T and PV: 2 * (2 * S * S * d) per head.
        return sum(4.0 * q[0] * q[1] * q[2] * q[2] * q[3] for q, _ in self.attention)


def logical_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear, quantized or not (a LoRA wrapper reports its base)."""
    base = getattr(m, "base", None)
    if isinstance(base, nn.Module):
        m = base
    out, cols = m["weight"].shape
    return (out, cols * 32 // m.bits) if "scales" in m else (out, cols)


def is_quantized(m: nn.Module) -> bool:
    base = getattr(m, "base", None)
    return "scales" in (base if isinstance(base, nn.Module) else m)


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def _linear_classes() -> list[type]:
    """Every linear layer class: MLX's, their subclasses (e.g. flux_1.quantization.QuantizedLinear,
    whose CPU path dequantizes), and the LoRA wrappers."""
    from flux_1.lora import LoRALinear

    classes = _subclasses(nn.Linear) + _subclasses(nn.QuantizedLinear) + [LoRALinear]
    return list(dict.fromkeys(classes))


@contextlib.contextmanager
def record() -> Calls:
    """Record the outermost linear calls and every FLUX attention call made inside the block."""
    calls = Calls()
    depth = [0]
    originals = {}

    def wrap(cls):
        original = cls.__call__

        def recorded(self, x, *args, **kwargs):
            if depth[0] == 0:
                calls.linears.append((self, tuple(x.shape)))
            depth[0] += 1
            try:
                return original(self, x, *args, **kwargs)
            finally:
                depth[0] -= 1

        originals[cls] = original
        cls.__call__ = recorded

    for cls in _linear_classes():
        if "__call__" in cls.__dict__:
            wrap(cls)
    attention = transformer_module.attention

    def recorded_attention(q, k, v, pe):
        calls.attention.append((tuple(q.shape), tuple(pe[0].shape)))
        return attention(q, k, v, pe)

    transformer_module.attention = recorded_attention

    # tanh-GELU: the blocks call transformer.gelu_tanh (directly, and through the GELUTanh modules of the
    # double blocks' MLPs); older code called nn.gelu_approx / nn.GELU: all three are recorded.
    gelu_fn = nn.gelu_approx
    gelu_call = nn.GELU.__call__
    gelu_tanh = transformer_module.gelu_tanh

    def recorded_gelu(x):
        calls.activations.append((tuple(x.shape), str(x.dtype)))
        return gelu_fn(x)

    def recorded_gelu_module(self, x):
        calls.activations.append((tuple(x.shape), str(x.dtype)))
        return gelu_call(self, x)

    def recorded_gelu_tanh(x):
        n = len(calls.activations)
        out = gelu_tanh(x)  # on a GPU it calls nn.gelu_approx: recorded once, here
        del calls.activations[n:]
        calls.activations.append((tuple(x.shape), str(x.dtype)))
        return out

    nn.gelu_approx = recorded_gelu
    nn.GELU.__call__ = recorded_gelu_module
    transformer_module.gelu_tanh = recorded_gelu_tanh
    try:
        yield calls
    finally:
        transformer_module.attention = attention
        transformer_module.gelu_tanh = gelu_tanh
        nn.gelu_approx = gelu_fn
        nn.GELU.__call__ = gelu_call
        for cls, original in originals.items():
            cls.__call__ = original


def record_calls(fn: Callable[[], object]) -> tuple[Calls, float]:
    """Run `fn` lazily (its result is dropped unevaluated). Returns the calls and the graph-build time."""
    with record() as calls:
        t0 = time.perf_counter()
        out = fn()
        build = time.perf_counter() - t0
    del out
    return calls, build


# ---------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable[[], object], reps: int = 2, warmup: int = 1) -> float:
    """Best wall time of `mx.eval(fn())` over `reps` runs after `warmup` untimed ones.

    A call slower than half a second is not repeated: its warm-up run counts as one of two samples
    (on the CPU there is nothing to warm up but allocation; this halves the probing time).
    """
    best = math.inf
    for _ in range(warmup):
        t0 = time.perf_counter()
        mx.eval(fn())
        first = time.perf_counter() - t0
        if first > 0.5:
            best, reps = first, 1
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _signature(m: nn.Module) -> tuple:
    from mlx.utils import tree_flatten

    params = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in tree_flatten(m.parameters()))
    side = getattr(m, "_side", None)
    extra = ()
    if side is not None:
        extra = tuple((k, tuple(v.shape)) for k, v in vars(side).items() if v is not None)
    return (type(m).__name__, params, extra)


@dataclass
class LinearProbe:
    seconds: float  # sum over every recorded call
    calls: int
    groups: int  # distinct (module kind, shape[, rows]) timed
    sampled: bool  # some groups were timed on sampled rows and scaled
    detail: list[dict] = field(default_factory=list)  # per group: kind, (out, in), rows, calls, s, GFLOP/s


def probe_linears(calls: Calls, dtype: mx.Dtype, sample_rows: int | None = None,
                  fn: Callable[[nn.Module, mx.array], mx.array] | None = None, reps: int = 2) -> LinearProbe:
    """Time every recorded linear call, one timing per distinct module kind and shape.

    With `sample_rows`, quantized layers are timed on `sample_rows` and on twice as many rows, and the
    time of each call is read off the line through both points (a fixed cost per call, e.g. a dequantize,
    plus a cost per row, e.g. MLX's CPU quantized_matmul); others are timed at their real input shape.
    `fn(module, x)` replaces the module's own forward (to time an alternative implementation).
    """
    fn = fn or (lambda m, x: m(x))
    groups: dict[tuple, list] = {}
    for m, shape in calls.linears:
        rows = math.prod(shape[:-1])
        per_row = sample_rows is not None and is_quantized(m) and rows > sample_rows
        key = (_signature(m), None if per_row else shape)
        groups.setdefault(key, [m, shape, per_row, []])[3].append(rows)
    total = 0.0
    sampled = False
    detail = []
    for m, shape, per_row, rows_list in groups.values():
        width = shape[-1]
        if per_row:
            x1 = mx.random.normal((1, sample_rows, width)).astype(dtype)
            x2 = mx.random.normal((1, 2 * sample_rows, width)).astype(dtype)
            warm = mx.random.normal((1, 1, width)).astype(dtype)
            mx.eval(fn(m, warm))
            t1 = timed(lambda m=m, x1=x1: fn(m, x1), reps=reps, warmup=0)
            t2 = timed(lambda m=m, x2=x2: fn(m, x2), reps=reps, warmup=0)
            per_row_s = max(t2 - t1, 0.0) / sample_rows
            fixed = max(t1 - per_row_s * sample_rows, 0.0) if per_row_s else min(t1, t2)
            seconds = sum(fixed + per_row_s * rows for rows in rows_list)
            sampled = True
        else:
            x = mx.random.normal(shape).astype(dtype)
            t = timed(lambda m=m, x=x: fn(m, x), reps=reps)
            seconds = t * len(rows_list)
        total += seconds
        out, inp = logical_shape(m)
        flops = 2.0 * out * inp * sum(rows_list)
        detail.append({"kind": type(m).__name__ + (f" q{m.bits}" if hasattr(m, "bits") else ""),
                       "out_in": [out, inp], "rows": sorted(set(rows_list)), "calls": len(rows_list),
                       "seconds": seconds, "gflops": flops / seconds / 1e9 if seconds else None,
                       "sampled_rows": sample_rows if per_row else None})
    return LinearProbe(total, len(calls.linears), len(groups), sampled, detail)


def lora_base(m: nn.Module) -> nn.Module | None:
    """The plain layer under a LoRA wrapper (flux_1.lora's LoRALinear or the bench fallback), else None."""
    for attr in ("_base", "base"):
        base = getattr(m, attr, None)
        if isinstance(base, nn.Module):
            return base
    return None


def probe_lora_overhead(calls: Calls, dtype: mx.Dtype, rounds: int = 2) -> dict:
    """Extra time of the LoRA side path per step, from paired timings: each distinct wrapped layer and
    its base layer are timed alternately on the same input, so machine load hits both alike."""
    groups: dict[tuple, list] = {}
    for m, shape in calls.linears:
        base = lora_base(m)
        if base is None:
            continue
        groups.setdefault((_signature(m), shape), [m, base, shape, 0])[3] += 1
    with_lora = without = 0.0
    for m, base, shape, n in groups.values():
        x = mx.random.normal(shape).astype(dtype)
        mx.eval(x, m(x), base(x))
        best_l = best_b = math.inf
        for _ in range(rounds):
            best_l = min(best_l, timed(lambda m=m, x=x: m(x), reps=1, warmup=0))
            best_b = min(best_b, timed(lambda base=base, x=x: base(x), reps=1, warmup=0))
        with_lora += n * best_l
        without += n * best_b
    return {"linears_with_lora_s": with_lora, "linears_without_lora_s": without,
            "overhead_s": with_lora - without, "layers": sum(g[3] for g in groups.values())}


def dequantized_matmul(m: nn.Module, x: mx.array) -> mx.array:
    """A quantized layer computed as dequantize-then-dense-GEMM (the proposed CPU path for many rows)."""
    base = getattr(m, "base", None)
    layer = base if isinstance(base, nn.Module) else m
    if "scales" not in layer:
        return m(x)
    w = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                      bits=layer.bits, mode=layer.mode).astype(x.dtype)
    y = x @ w.T
    if "bias" in layer:
        y = y + layer["bias"]
    return y


def probe_attention(calls: Calls, dtype: mx.Dtype) -> float:
    """Time the recorded FLUX attention calls (RoPE + SDPA + head merge) at their shapes."""
    groups: dict[tuple, int] = {}
    for q, pe in calls.attention:
        groups[(q, pe)] = groups.get((q, pe), 0) + 1
    total = 0.0
    for (q_shape, pe_shape), n in groups.items():
        q, k, v = (mx.random.normal(q_shape).astype(dtype) for _ in range(3))
        angles = mx.random.uniform(shape=pe_shape) * 6.28
        pe = (mx.cos(angles), mx.sin(angles))
        mx.eval(q, k, v, *pe)
        total += n * timed(lambda q=q, k=k, v=v, pe=pe: transformer_module.attention(q, k, v, pe))
    return total


def probe_activations(calls: Calls, dtype: mx.Dtype) -> float:
    """Time the recorded tanh-GELU calls at their shapes."""
    groups: dict[tuple, int] = {}
    for shape, _ in calls.activations:
        groups[shape] = groups.get(shape, 0) + 1
    total = 0.0
    for shape, n in groups.items():
        x = mx.random.normal(shape).astype(dtype)
        mx.eval(x)
        total += n * timed(lambda x=x: transformer_module.gelu_tanh(x))  # the form the model runs
    return total


def probe_sdpa(calls: Calls, dtype: mx.Dtype) -> float:
    """Time the recorded attention calls' softmax(q k^T) v alone, in the form the model runs (on the CPU
    models/cpu_math's, elsewhere MLX's fused kernel)."""
    from flux_1.models import cpu_math

    total = 0.0
    for q_shape, _ in calls.attention:
        q, k, v = (mx.random.normal(q_shape).astype(dtype) for _ in range(3))
        mx.eval(q, k, v)
        scale = q_shape[-1] ** -0.5
        total += timed(lambda q=q, k=k, v=v, s=scale: cpu_math.sdpa(q, k, v, scale=s), reps=1)
    return total


def gemm_rate(dtype: mx.Dtype, m: int = 1536, k: int = 3072, n: int = 3072) -> float:
    """Achieved GFLOP/s of one dense GEMM at a FLUX-like shape (the machine's practical matmul peak)."""
    a = mx.random.normal((m, k)).astype(dtype)
    b = mx.random.normal((k, n)).astype(dtype)
    mx.eval(a, b)
    return 2.0 * m * k * n / timed(lambda: a @ b, reps=3) / 1e9


def step_flops(params, img_tokens: int, txt_tokens: int) -> dict:
    """Closed-form FLOPs of one transformer forward, a cross-check of the count recorded from the code.

    Every token passes once through its stream's weights in each block: double block qkv 3D^2, proj D^2,
    MLP 2DF; single block linear1 D(3D+F), linear2 (D+F)D. Attention per block: QK^T and PV, 4 S^2 D.
    Modulation and the time/vector/guidance embedders run on one row (GEMVs).
    """
    p = params
    D, F = p.hidden_size, p.mlp_hidden
    S = img_tokens + txt_tokens
    double = 3 * D * D + D * D + 2 * D * F
    single = D * (3 * D + F) + (D + F) * D
    blocks = 2.0 * S * (p.depth * double + p.depth_single * single)
    edge = 2.0 * (img_tokens * p.in_channels * D + txt_tokens * p.context_dim * D + img_tokens * D * p.in_channels)
    embedders = 2.0 * ((p.time_dim * D + D * D) * (2 if p.guidance_embed else 1) + p.vec_dim * D + D * D)
    modulation = 2.0 * D * D * (p.depth * 12 + p.depth_single * 3 + 2)
    attention = (p.depth + p.depth_single) * 4.0 * S * S * D
    linear = blocks + edge + embedders + modulation
    return {"linear": linear, "attention": attention, "total": linear + attention,
            "block_linears": blocks}
