"""A/B experiments behind issue #14's CPU changes, each alternating its variants in one process.

    python -m bench.cpu_speed [--only NAME ...] [--rounds N] [--output-json PATH]

Timings on a shared VM drift by 10-40% between runs, so every experiment here interleaves its
variants round by round in one process and reports each variant's min and median (and the machine's
load average before and after); compare variants within one experiment, not across runs.

- `quantized_rows`: one (3072, 3072) layer, 4- and 8-bit affine: MLX's fused `quantized_matmul`,
  dequantize-then-GEMM, and a cached float weight, by rows M (where `FUSED_MAX_ROWS` comes from);
- `quantized_step`: the `slice` transformer (real width, 1 double + 2 single blocks, 256 image + 256 text
  tokens) as float32, `-q 4` and `-q 4` with a dequantized-weight cache, stepped alternately;
- `cache_limit`: the same float32 step with MLX's default buffer cache limit and with a larger one
  (what `Flux1` sets around denoising);
- `streams`: two independent elementwise ops on one CPU stream vs two (does the backend run them in
  parallel?);
- `vae_decode`: the real VAE decoder at 256x256, the working tree's `models/vae.py` against the one
  committed at HEAD (git), alternated on the same weights;
- `vae_upsample`: the decoder's nearest 2x + 3x3 conv upsamplers, upsampled copy then conv vs the upsample
  folded into the conv (4 phases of 2x2 taps on the low-resolution input), each upsampler alone and the
  whole 256x256 decode;
- `vae_conv`: one 3x3 conv at each of the decoder's shapes (256x256 decode), the ways of summing its 9 taps:
  `conv3x3_valid` (9 GEMMs accumulated by `addmm`, BLAS beta=1), the same with separate adds, one wide GEMM
  C -> 9*O then 8 shifted adds, three GEMMs with K = 3C on a copy holding the 3 column shifts side by side;
  and one of the 9 tap GEMMs alone (the GEMM's own rate at that shape);
- `cpu_math`: MLX's exp-based tanh-GELU, GroupNorm SiLU and SDPA against models/cpu_math's forms (a
  polynomial exp fused into the pass), at the `slice` step's and a 256x256 decode's shapes;
- `step`: one `slice` transformer call, the working tree's transformer.py against the one at HEAD (git).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import bench  # noqa: F401

SLICE_TOKENS = (256, 256)  # image tokens (256x256 pixels), T5 tokens


def alternate(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict:
    """Wall times of `mx.eval(fn())` per variant, the variants run in turn each round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            mx.eval(fn())
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: {"min_s": min(ts), "median_s": statistics.median(ts), "all_s": ts} for name, ts in times.items()}


def quantized_rows(rounds: int, rows=(1, 2, 4, 8, 64, 512)) -> dict:
    """Fused kernel vs dequantize + GEMM (ours; and `planar_matmul` for 4 bits) vs cached float weight, one
    (3072, 3072) layer, by rows."""
    from flux_1 import quantization as q

    w = mx.random.normal((3072, 3072), key=mx.random.key(0)) * 0.02
    out = {}
    for bits in (4, 8):
        codes, scales, biases = mx.quantize(w, 64, bits)
        dense = mx.dequantize(codes, scales, biases, 64, bits)
        mx.eval(codes, scales, biases, dense)
        for m in rows:
            x = mx.random.normal((m, 3072), key=mx.random.key(m))
            mx.eval(x)
            c, s, b, d, n = codes, scales, biases, dense, bits
            variants = {
                "fused": lambda x=x, c=c, s=s, b=b, n=n: mx.quantized_matmul(x, c, s, b, True, 64, n),
                "dequantize_gemm": lambda x=x, c=c, s=s, b=b, n=n: x @ q.dequantize(c, s, b, 64, n).T,
                "cached_float": lambda x=x, d=d: x @ d.T,
            }
            if q.planar(c, n, "affine", b):
                variants["planar"] = lambda x=x, c=c, s=s, b=b, n=n: q.planar_matmul(x, c, s, b, 64, n)
            timings = alternate(variants, rounds)
            out[f"q{bits}_rows{m}"] = {k: round(v["min_s"] * 1e3, 2) for k, v in timings.items()}  # ms
    return out


def _slice_inputs(params, tokens=SLICE_TOKENS) -> tuple:
    n, L = tokens
    keys = mx.random.split(mx.random.key(1), 4)
    img = mx.random.normal((1, n, params.in_channels), key=keys[0])
    txt = mx.random.normal((1, L, params.context_dim), key=keys[1])
    pooled = mx.random.normal((1, params.vec_dim), key=keys[2])
    side = int(n**0.5)
    img_ids = mx.stack([mx.zeros((n,)), mx.arange(n) // side, mx.arange(n) % side], axis=-1)
    txt_ids = mx.zeros((L, 3))
    args = (img, txt, pooled, mx.array([0.5]), img_ids, txt_ids, mx.array([3.5]))
    mx.eval(args)
    return args


def _slice_transformer():
    from flux_1.models.transformer import FluxParams, FluxTransformer

    params = FluxParams(depth=1, depth_single=2, guidance_embed=True)
    model = FluxTransformer(params)
    # Random weights of about the trained models' scale, so quantization sees realistic ranges.
    model.update(nn.utils.tree_map(lambda p: p * 0.5, model.parameters()))
    mx.eval(model.parameters())
    return params, model


def quantized_step(rounds: int, bits: int = 4) -> dict:
    from mlx.utils import tree_flatten

    from flux_1 import quantization as q

    params, dense = _slice_transformer()
    quant = type(dense)(params)
    quant.update(dense.parameters())
    plan = q.layer_plan(quant, "transformer", q.QuantSpec(bits=bits))
    q.quantize_loaded(quant, plan)
    cached = type(dense)(params)
    q.quantize_skeleton(cached, plan)
    cached.update(quant.parameters())  # shares the codes; its layers keep their own float copies
    args = _slice_inputs(params)
    q.set_dequantized_cache(0)
    uncached_call = lambda: quant(*args)  # noqa: E731

    def cached_call():
        q.set_dequantized_cache(2**40)
        try:
            return cached(*args)
        finally:
            q.set_dequantized_cache(0)

    with _cache_limit(8 * 2**30):  # as while denoising (StepBufferCache): buffers reused, not page-faulted
        out = alternate({"float32": lambda: dense(*args), f"q{bits}": uncached_call,
                         f"q{bits}_cached": cached_call}, rounds)
    out["cached_bytes"] = q.dequantized_cache_bytes()
    out["quantized_weight_bytes"] = sum(v.nbytes for _, v in tree_flatten(quant.parameters()))
    out["float32_weight_bytes"] = sum(v.nbytes for _, v in tree_flatten(dense.parameters()))
    q.drop_dequantized(cached)
    return out


def cache_limit(rounds: int, limit_bytes: int = 4 * 2**30) -> dict:
    """The float32 `slice` step with MLX's CPU buffer cache at its default limit (32 MiB: every larger
    buffer freed goes back to the OS and is page-faulted in again) and at `limit_bytes`; with the minor
    page faults each step takes (getrusage), which machine load does not blur."""
    import resource

    params, model = _slice_transformer()
    args = _slice_inputs(params)
    default = mx.set_cache_limit(0)  # returns the previous (default) limit
    mx.set_cache_limit(default)
    runs: dict[str, dict[str, list]] = {name: {"s": [], "page_faults": []} for name in ("default", "large")}

    def two_steps(name, limit):
        # A generation's steps follow each other: the second step is the one timed, with what the first
        # left in the cache (the other variant's steps in between would trim it).
        def steps():
            mx.set_cache_limit(limit)
            mx.eval(model(*args))
            before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            y = model(*args)
            mx.eval(y)
            runs[name]["s"].append(time.perf_counter() - t0)
            runs[name]["page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            mx.set_cache_limit(default)
            mx.clear_cache()
            return y
        return steps

    alternate({"default": two_steps("default", default), "large": two_steps("large", limit_bytes)}, rounds)
    out = {f"{name}_limit": {"min_s": min(r["s"][1:]), "median_s": statistics.median(r["s"][1:]),
                             "page_faults": r["page_faults"][1:]} for name, r in runs.items()}
    out["default_limit_bytes"], out["large_limit_bytes"] = default, limit_bytes
    return out


def streams(rounds: int) -> dict:
    x = mx.random.normal((1536, 12288), key=mx.random.key(2))
    y = mx.random.normal((1536, 12288), key=mx.random.key(3))
    mx.eval(x, y)
    second = mx.new_stream(mx.cpu)
    return alternate({
        "one_stream": lambda: (mx.exp(x), mx.exp(y)),
        "two_streams": lambda: (mx.exp(x), mx.exp(y, stream=second)),
    }, rounds)


def _model_at(revision: str, name: str):
    """models/<name>.py as committed at `revision` (git), imported as a module of its own, with the
    cpu_math committed at `revision` too: a model before a change, to alternate with the current one on
    the same weights."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    module_name = f"{name}_at_{revision}".replace("~", "_").replace("^", "_").replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    source = subprocess.run(["git", "show", f"{revision}:src/flux_1/models/{name}.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    if name != "cpu_math" and "from . import cpu_math" in source:
        old_math = _model_at(revision, "cpu_math").__name__
        source = source.replace("from . import cpu_math", f"import {old_math} as cpu_math")
    path = Path(tempfile.mkdtemp()) / f"{module_name}.py"
    path.write_text(source.replace("from . import", "from flux_1.models import")
                    .replace("from .shapes import", "from flux_1.models.shapes import"))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def vae_decode(rounds: int, size: int = 256, before: str = "HEAD") -> dict:
    """The real VAE decoder at `size` x `size`: the working tree's against the one committed at `before`."""
    from flux_1.models import vae

    model = vae.AutoEncoder(vae.VAEParams())
    model.update(nn.utils.tree_map(lambda p: p * 0.5, model.parameters()))
    old = _model_at(before, "vae").AutoEncoder(vae.VAEParams())
    old.update(model.parameters())
    mx.eval(model.parameters())
    z = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(4))
    mx.eval(z)
    new_image, old_image = model.decode(z), old.decode(z)
    out = alternate({"current": lambda: model.decode(z), before: lambda: old.decode(z)}, rounds)
    out["max_abs_diff"] = mx.abs(new_image - old_image).max().item()
    return out


def decode_parts(rounds: int, size: int = 256, before: str = "HEAD") -> dict:
    """Where a `size` x `size` decode goes, the working tree's VAE against `before`'s (with its cpu_math):
    each 3x3 conv, upsampler conv, GroupNorm (+ SiLU) evaluated and timed alone inside the decode (its
    input evaluated first), the last of `rounds` decodes; seconds."""
    from flux_1.models import vae

    return {label: _decode_parts(module, size, rounds)
            for label, module in (("current", vae), (before, _model_at(before, "vae")))}


def _decode_parts(module, size: int, rounds: int) -> dict:
    import collections

    model = module.AutoEncoder(module.VAEParams())
    model.update(nn.utils.tree_map(lambda p: p * 0.5, model.parameters()))
    mx.eval(model.parameters())
    z = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(4))
    mx.eval(z)
    parts = collections.defaultdict(float)
    saved = []

    def timed(cls, method, part):
        real = getattr(cls, method)
        saved.append((cls, method, real))

        def call(self, x, *args, **kwargs):
            mx.eval(x)
            t0 = time.perf_counter()
            y = real(self, x, *args, **kwargs)
            mx.eval(y)
            parts[part(self)] += time.perf_counter() - t0
            return y
        setattr(cls, method, call)

    timed(module.Conv3x3, "__call__", lambda conv: "conv3x3" if conv.weight.shape[0] > 3 else "conv_out")
    timed(module.Conv3x3, "upsampled", lambda conv: "upsampler_conv")
    timed(module.GroupNorm, "__call__", lambda norm: "group_norm_silu")
    try:
        for _ in range(max(1, rounds)):
            parts.clear()
            t0 = time.perf_counter()
            mx.eval(model.decode(z))
            total = time.perf_counter() - t0
    finally:
        for cls, method, real in saved:
            setattr(cls, method, real)
    return {**{k: round(v, 4) for k, v in parts.items()}, "total": round(total, 4),
            "rest": round(total - sum(parts.values()), 4)}


def vae_upsample(rounds: int, size: int = 256) -> dict:
    """The decoder's upsamplers (nearest 2x, then a 3x3 conv) with the upsample made and then `Conv3x3`
    ("unfolded", as before) against the upsample folded into the conv (`Conv3x3.upsampled`, "folded"): each
    upsampler alone at its shape in a `size` x `size` decode, then the whole decode with each, alternated on
    the same weights in this process."""
    from contextlib import contextmanager

    from flux_1.models import vae

    model = vae.AutoEncoder(vae.VAEParams())
    model.update(nn.utils.tree_map(lambda p: p * 0.5, model.parameters()))
    mx.eval(model.parameters())
    out = {}
    side = size // 8
    for i, block in enumerate(model.decoder.up_blocks):
        if "upsamplers" not in block:
            continue
        conv = block.upsamplers[0].conv
        x = mx.random.normal((1, side << i, side << i, conv.weight.shape[-1]), key=mx.random.key(i))
        mx.eval(x)
        name = f"up{i}_{side << i}x{side << i}x{conv.weight.shape[-1]}"
        timings = alternate({"unfolded": lambda x=x, c=conv: c(vae.upsample_nearest2x(x)),
                             "folded": lambda x=x, c=conv: c.upsampled(x)}, rounds)
        out.update({f"{name}_{k}": v for k, v in timings.items()})
        out[f"{name}_max_abs_diff"] = mx.abs(conv(vae.upsample_nearest2x(x)) - conv.upsampled(x)).max().item()

    @contextmanager
    def unfolded():
        folded_call = vae.Upsample.__call__
        vae.Upsample.__call__ = lambda self, x: self.conv(vae.upsample_nearest2x(x))
        try:
            yield
        finally:
            vae.Upsample.__call__ = folded_call

    def decode_unfolded():
        with unfolded():  # the graph is built here; what evaluates it later does not call Upsample again
            return model.decode(z)

    z = mx.random.normal((1, side, side, 16), key=mx.random.key(4))
    mx.eval(z)
    timings = alternate({"decode_unfolded": decode_unfolded, "decode_folded": lambda: model.decode(z)}, rounds)
    out.update(timings)
    out["decode_max_abs_diff"] = mx.abs(decode_unfolded() - model.decode(z)).max().item()
    return out


def vae_conv(rounds: int, size: int = 256) -> dict:
    """How a 3x3 conv (padded input (1, h+2, w+2, C), weight (O, 3, 3, C)) sums its 9 taps, at the decoder's
    conv shapes in a `size` x `size` decode: seconds (min, median), GFLOP/s of the whole conv, and the max abs
    difference from `conv3x3_valid`."""
    from flux_1.models import vae

    def taps_of(x, weight):
        _, hp, wp, C = x.shape
        return x.reshape(-1, C), (hp - 2) * wp - 2, wp, weight.transpose(1, 2, 3, 0)

    def crop(out, x):
        _, hp, wp, _ = x.shape
        return mx.pad(out, [(0, 2), (0, 0)]).reshape(1, hp - 2, wp, -1)[:, :, : wp - 2]

    def separate_adds(x, weight):
        rows, n, wp, taps = taps_of(x, weight)
        out = rows[:n] @ taps[0, 0]
        for i, j in ((i, j) for i in range(3) for j in range(3) if i or j):
            out = out + rows[i * wp + j : i * wp + j + n] @ taps[i, j]
        return crop(out, x)

    def wide_gemm(x, weight):
        _, hp, wp, C = x.shape
        out_ch = weight.shape[0]
        each = x.reshape(-1, C) @ weight.transpose(3, 1, 2, 0).reshape(C, 9 * out_ch)
        each = each.reshape(1, hp, wp, 3, 3, out_ch)
        out = each[:, : hp - 2, : wp - 2, 0, 0]
        for i, j in ((i, j) for i in range(3) for j in range(3) if i or j):
            out = out + each[:, i : i + hp - 2, j : j + wp - 2, i, j]
        return out

    def k3(x, weight):
        rows, n, wp, taps = taps_of(x, weight)
        C, out_ch = rows.shape[1], weight.shape[0]
        m = rows.shape[0] - 2
        side = mx.concatenate([rows[j : j + m] for j in range(3)], axis=1)  # (m, 3C): column shifts 0, 1, 2
        taps = taps.reshape(3, 3 * C, out_ch)
        out = side[:n] @ taps[0]
        for i in (1, 2):
            out = mx.addmm(out, side[i * wp : i * wp + n], taps[i])
        return crop(out, x)

    def one_tap(x, weight):
        rows, n, _, taps = taps_of(x, weight)
        return rows[:n] @ taps[0, 0]

    side = size // 8
    shapes = [(side, 512, 512), (2 * side, 512, 512), (4 * side, 512, 256), (4 * side, 256, 256),
              (8 * side, 256, 128), (8 * side, 128, 128)]
    out = {}
    for k, (hw, C, out_ch) in enumerate(shapes):
        x = mx.random.normal((1, hw + 2, hw + 2, C), key=mx.random.key(10 + k))
        weight = mx.random.normal((out_ch, 3, 3, C), key=mx.random.key(20 + k)) * (1 / (9 * C) ** 0.5)
        mx.eval(x, weight)
        variants = {"addmm": vae.conv3x3_valid, "separate_adds": separate_adds, "wide_gemm": wide_gemm, "k3": k3}
        reference = vae.conv3x3_valid(x, weight)
        name = f"{hw}x{hw}_{C}to{out_ch}"
        timed = {**variants, "one_tap": one_tap}
        timings = alternate({v: (lambda f=f, x=x, w=weight: f(x, w)) for v, f in timed.items()}, rounds)
        gflop = 2 * hw * hw * C * out_ch * 9 / 1e9
        for v, t in timings.items():
            work = gflop / 9 if v == "one_tap" else gflop
            out[f"{name}_{v}"] = {**t, "gflop_per_s": round(work / t["min_s"], 1)}
        for v, f in variants.items():
            out[f"{name}_{v}_max_abs_diff"] = mx.abs(f(x, weight) - reference).max().item()
    return out


def cpu_math(rounds: int, tokens: int = sum(SLICE_TOKENS), before: str = "HEAD") -> dict:
    """MLX's exp-based ops against models/cpu_math's forms (the working tree's and `before`'s), at the
    `slice` step's shapes: the MLP's tanh-GELU (tokens x 12288), a VAE norm's SiLU (256x256x128),
    attention (24 heads x tokens x 128)."""
    from flux_1.models import cpu_math as fast

    old = _model_at(before, "cpu_math")
    from flux_1.models.transformer import FluxParams

    c1 = 2 * math.sqrt(2 / math.pi)
    c3 = c1 * 0.044715
    mlx_gelu = mx.compile(lambda x: x / (1 + mx.exp(-x * (c1 + c3 * (x * x)))))  # the form before cpu_math
    mlx_silu = mx.compile(lambda x, a, b: (lambda y: y / (1 + mx.exp(-y)))(x * a + b))
    p = FluxParams()
    keys = mx.random.split(mx.random.key(0), 5)
    hidden = mx.random.normal((1, tokens, p.mlp_hidden), key=keys[0]) * 2
    image = mx.random.normal((1, 256, 256, 128), key=keys[1]) * 2
    scale, shift = mx.ones((128,)), mx.zeros((128,))
    q, k, v = (mx.random.normal((1, p.num_heads, tokens, p.head_dim), key=key) for key in keys[2:])
    mx.eval(hidden, image, q, k, v)
    with _cache_limit(4 * 2**30):  # as while denoising: fresh buffers would page-fault in every variant
        out = alternate({
            "gelu_mlx": lambda: mlx_gelu(hidden), "gelu_cpu_math": lambda: fast.gelu_tanh(hidden),
            f"gelu_{before}": lambda: old.gelu_tanh(hidden),
            "silu_mlx": lambda: mlx_silu(image, scale, shift),
            "silu_cpu_math": lambda: fast.scale_shift_silu(image, scale, shift),
            f"silu_{before}": lambda: old.scale_shift_silu(image, scale, shift),
            "sdpa_mlx": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=p.head_dim**-0.5),
            "sdpa_cpu_math": lambda: fast.attention(q, k, v, scale=p.head_dim**-0.5),
            f"sdpa_{before}": lambda: old.attention(q, k, v, scale=p.head_dim**-0.5),
            "attention_matmuls_only": lambda: (q @ k.swapaxes(-1, -2)) @ v,
        }, rounds)
    out["gelu_max_abs_diff"] = mx.abs(mlx_gelu(hidden) - fast.gelu_tanh(hidden)).max().item()
    out["sdpa_max_abs_diff"] = mx.abs(fast.attention(q, k, v, scale=p.head_dim**-0.5)
                                      - mx.fast.scaled_dot_product_attention(q, k, v, scale=p.head_dim**-0.5)
                                      ).max().item()
    return out


def step(rounds: int, before: str = "HEAD") -> dict:
    """One `slice` transformer call (float32): the working tree's transformer.py against `before`'s."""
    params, model = _slice_transformer()
    old = _model_at(before, "transformer").FluxTransformer(params)
    old.update(model.parameters())
    args = _slice_inputs(params)
    with _cache_limit(4 * 2**30):
        out = alternate({"current": lambda: model(*args), before: lambda: old(*args)}, rounds)
    out["max_abs_diff"] = mx.abs(model(*args) - old(*args)).max().item()
    return out


@contextmanager
def _cache_limit(limit: int):
    previous = mx.set_cache_limit(limit)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


EXPERIMENTS = {"quantized_rows": quantized_rows, "quantized_step": quantized_step, "cache_limit": cache_limit,
               "streams": streams, "vae_decode": vae_decode, "vae_upsample": vae_upsample,
               "vae_conv": vae_conv, "cpu_math": cpu_math, "step": step, "decode_parts": decode_parts}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=sorted(EXPERIMENTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--before", default="HEAD", help="the git revision that vae_decode, step and cpu_math compare "
                   "against (its models/*.py and cpu_math.py)")
    args = p.parse_args(argv)
    results = {"load_before": list(os.getloadavg()), "before": args.before}
    for name in args.only:
        takes_before = "before" in inspect.signature(EXPERIMENTS[name]).parameters
        results[name] = EXPERIMENTS[name](args.rounds, **({"before": args.before} if takes_before else {}))
        summary = {k: (round(v["min_s"], 4), round(v["median_s"], 4)) if isinstance(v, dict) and "min_s" in v
                   else v for k, v in results[name].items()}
        print(name, json.dumps(summary, default=str), flush=True)
    results["load_after"] = list(os.getloadavg())
    print("load average", results["load_before"], "->", results["load_after"])
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
