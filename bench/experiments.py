"""Micro-benchmarks behind the profile findings in BENCHMARKS.md (FLUX `mid` shapes).

    python -m bench.experiments [--only NAME ...]

- `elementwise`: MLX vs torch (same thread count) on the non-GEMM work of a block: tanh-GELU over a
  (1536, 12288) MLP activation, and SDPA over 24 heads x 1536 tokens x 128;
- `streams`: the same two ops split in halves over two MLX CPU streams (MLX's CPU elementwise kernels
  run on one thread per stream; BLAS GEMMs already use every core);
- `gelu_forms`: tanh-GELU as MLX computes it vs the identical x * sigmoid(2z) form; `mx.compile` of the
  blocks' elementwise chains (modulate, gated residual);
- `lora_interleaved`: steps of the `mid` transformer alternately without and with a rank-16 LoRA
  (the end-to-end LoRA overhead, robust to other load on the machine);
- `quantized`: one quantized linear at real shape: quantized_matmul time per row at the sampled row
  count the projection uses vs at the real row count (validates the linear-in-rows scaling), and
  dequantize + dense GEMM as the alternative.

Retired: `vs_diffusers_interleaved` (ours and diffusers in one process: torch's `sgemm_` bound to the
OpenBLAS flux_1 loads, about 15% slower than torch's own); `python -m bench --alternate N` replaces it
(diffusers in its own process on its own BLAS). The torch figures of `elementwise` share that process
too: its GEMM-free ops (exp, GELU) are unaffected. The A/B experiments of issue #14 are in
`bench/cpu_speed.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn

import bench  # noqa: F401

from .profile import timed


def elementwise(threads: int) -> dict:
    h = mx.random.normal((1, 1536, 12288))
    q = mx.random.normal((1, 24, 1536, 128))
    mx.eval(h, q)
    out = {
        "mlx_gelu_tanh_s": timed(lambda: nn.gelu_approx(h)),
        "mlx_sdpa_s": timed(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=128**-0.5)),
        "mlx_exp_ns_per_elem": timed(lambda: mx.exp(h)) / h.size * 1e9,
    }
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(threads)
    th, tq = torch.randn(1, 1536, 12288), torch.randn(1, 24, 1536, 128)

    def ttimed(fn, reps=3):
        fn()
        best = math.inf
        for _ in range(reps):
            import time

            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    out.update(
        torch_threads=threads,
        torch_gelu_tanh_s=ttimed(lambda: torch.nn.functional.gelu(th, approximate="tanh")),
        torch_sdpa_s=ttimed(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tq, tq)),
        torch_exp_ns_per_elem=ttimed(lambda: torch.exp(th)) / th.numel() * 1e9,
    )
    return out


def streams() -> dict:
    h = mx.random.normal((1, 1536, 12288))
    q = mx.random.normal((1, 24, 1536, 128))
    mx.eval(h, q)
    s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)

    def gelu_split():
        a, b = mx.split(h, 2, axis=1)
        with mx.stream(s1):
            ra = nn.gelu_approx(a)
        with mx.stream(s2):
            rb = nn.gelu_approx(b)
        return mx.concatenate([ra, rb], axis=1)

    def sdpa_split():
        a, b = q[:, :12], q[:, 12:]
        with mx.stream(s1):
            ra = mx.fast.scaled_dot_product_attention(a, a, a, scale=128**-0.5)
        with mx.stream(s2):
            rb = mx.fast.scaled_dot_product_attention(b, b, b, scale=128**-0.5)
        return mx.concatenate([ra, rb], axis=1)

    return {
        "gelu_one_stream_s": timed(lambda: nn.gelu_approx(h)),
        "gelu_two_streams_s": timed(gelu_split),
        "sdpa_one_stream_s": timed(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=128**-0.5)),
        "sdpa_two_streams_s": timed(sdpa_split),
    }


def quantized(rows: int = 1024, sample_rows: int = 32, bits: int = 8) -> dict:
    """A (9216, 3072) qkv projection, as in every double block, at `rows` image tokens."""
    layer = nn.Linear(3072, 9216)
    mx.eval(layer.parameters())
    ql = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits)
    mx.eval(ql.parameters())
    x_full = mx.random.normal((1, rows, 3072))
    x_sample = mx.random.normal((1, sample_rows, 3072))
    mx.eval(x_full, x_sample)
    sampled = timed(lambda: ql(x_sample), reps=2, warmup=0)
    full = timed(lambda: ql(x_full), reps=1, warmup=0)
    from .profile import dequantized_matmul

    return {
        "shape_out_in": [9216, 3072], "bits": bits, "rows": rows, "sample_rows": sample_rows,
        "quantized_full_rows_s": full,
        "quantized_projected_from_sample_s": sampled / sample_rows * rows,
        "dequantize_gemm_s": timed(lambda: dequantized_matmul(ql, x_full)),
        "float32_gemm_s": timed(lambda: layer(x_full)),
    }


def lora_interleaved(weights_dir: str | None, pairs: int = 3, rank: int = 16, config: str = "mid") -> dict:
    """End-to-end LoRA overhead robust to machine load: one loaded transformer, steps alternately
    without and with a rank-`rank` LoRA on every linear (applied and removed between steps)."""
    import time
    from pathlib import Path

    import numpy as np

    from flux_1.loading import folder as loader
    from flux_1.pipeline import sampler

    from . import configs, weights
    from . import lora as bench_lora
    from .common import Clock, make_inputs

    cfg = configs.get(config)
    root = Path(weights_dir) if weights_dir else Path(f"/tmp/flux-bench-{config}")
    weights.write_folder(cfg, root, log=lambda *a: None)
    inputs = make_inputs(cfg, 2 * pairs + 1)
    tr = loader.load_folder_component(root, "transformer", mx.float32)
    rng = np.random.default_rng(0)
    txt = mx.array(rng.standard_normal((1, cfg.txt_tokens, cfg.transformer.context_dim), np.float32))
    pooled = mx.array(rng.standard_normal((1, cfg.transformer.vec_dim), np.float32))
    x = mx.array(inputs["noise"])
    img_ids, txt_ids = sampler.image_ids(cfg.height, cfg.width), sampler.text_ids(cfg.txt_tokens)
    pe = tr.position_embedding(img_ids, txt_ids)
    guidance = mx.array([3.5])
    sig = [float(v) for v in inputs["sigmas"]]

    def step(i):
        v = tr(x, txt, pooled, mx.array([sig[i]]), img_ids, txt_ids, guidance=guidance, pe=pe)
        mx.eval(v)

    step(0)  # warm-up
    out = {"without_s": [], "with_s": [], "without_others_cores": [], "with_others_cores": []}
    for i in range(pairs):
        with Clock() as c:
            step(i)
        out["without_s"].append(c.s)
        out["without_others_cores"].append(c.others / c.s if c.others is not None else None)
        t0 = time.perf_counter()
        info = bench_lora.apply(tr, rank)
        out.setdefault("apply_s", []).append(time.perf_counter() - t0)
        with Clock() as c:
            step(i)
        out["with_s"].append(c.s)
        out["with_others_cores"].append(c.others / c.s if c.others is not None else None)
        bench_lora.remove(tr, info)
    out["lora_impl"] = info["lora_impl"]
    out["overhead_per_pair"] = [w / o - 1 for w, o in zip(out["with_s"], out["without_s"], strict=True)]
    return out


def gelu_forms() -> dict:
    """tanh-GELU as MLX computes it, and the identical x * sigmoid(2z) form; elementwise fusion."""
    h = mx.random.normal((1, 1536, 12288))
    x = mx.random.normal((1, 1536, 3072))
    y = mx.random.normal((1, 1536, 3072))
    shift, scale = mx.random.normal((1, 1, 3072)), mx.random.normal((1, 1, 3072))
    mx.eval(h, x, y, shift, scale)
    c = math.sqrt(2 / math.pi)

    def sigmoid_form(v):
        return v * mx.sigmoid(2 * c * (v + 0.044715 * v * v * v))

    def modulate(v, sh, sc):
        return mx.fast.layer_norm(v, None, None, 1e-6) * (1 + sc) + sh

    def gate(v, g, w):
        return v + g * w

    ref = nn.gelu_approx(h)
    return {
        "gelu_approx_s": timed(lambda: nn.gelu_approx(h)),
        "gelu_sigmoid_form_s": timed(lambda: sigmoid_form(h)),
        "gelu_sigmoid_form_compiled_s": timed(lambda: mx.compile(sigmoid_form)(h)),
        "gelu_forms_max_abs_diff": float(mx.abs(sigmoid_form(h) - ref).max()),
        "modulate_eager_s": timed(lambda: modulate(x, shift, scale)),
        "modulate_compiled_s": timed(lambda: mx.compile(modulate)(x, shift, scale)),
        "gate_eager_s": timed(lambda: gate(x, scale, y)),
        "gate_compiled_s": timed(lambda: mx.compile(gate)(x, scale, y)),
    }


EXPERIMENTS = {"elementwise": lambda a: elementwise(a.threads), "streams": lambda a: streams(),
               "quantized": lambda a: quantized(bits=8), "quantized4": lambda a: quantized(bits=4),
               "lora_interleaved": lambda a: lora_interleaved(a.weights_dir),
               "gelu_forms": lambda a: gelu_forms()}
# The interleaved ones load the `mid` transformer (minutes): on request.
DEFAULT = ["elementwise", "gelu_forms", "streams", "quantized", "quantized4"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.experiments")
    p.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=DEFAULT)
    p.add_argument("--weights-dir", default=None, help="lora_interleaved: the mid weights folder (written if absent)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    out = {}
    for name in args.only:
        out[name] = EXPERIMENTS[name](args)
        print(name, json.dumps(out[name], indent=1), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
