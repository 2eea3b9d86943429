"""One LoRA/QLoRA training step of the transformer (forward, backward, AdamW update): time and peak memory.

    python -m bench.train_step --config mid --ranks 4 16 --bases float32 8 4 [--compile] [--grad-checkpoint]

Random weights (the cost does not depend on the values) at the config's widths and block counts, one
512x512 sample with the config's T5 tokens, adapters on `--targets`. Prints one row per (base, rank):
seconds per step (median of `--steps` after `--warmup`) and MLX's peak memory during the steps.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim

import flux_1  # noqa: F401  (the BLAS setup, before the first mlx computation)
from flux_1.models.transformer import FluxTransformer
from flux_1.quantization import QuantSpec, layer_plan, quantize_loaded
from flux_1.training import AdapterConfig, attach, loss_and_grad

from . import configs

GB = 1e9


def build(cfg, base: str, rank: int, targets: str, grad_checkpoint: bool) -> FluxTransformer:
    mx.random.seed(0)
    t = FluxTransformer(cfg.transformer)
    if base == "bfloat16":
        t.set_dtype(mx.bfloat16)
    mx.eval(t.parameters())
    if base not in ("float32", "bfloat16"):
        quantize_loaded(t, layer_plan(t, "transformer", QuantSpec(bits=int(base))))
    attach(t, AdapterConfig(rank=rank, alpha=float(rank), targets=targets))
    t.grad_checkpoint = grad_checkpoint
    return t


def batch(cfg, dtype) -> dict[str, mx.array]:
    k = mx.random.split(mx.random.key(1), 4)
    h, w = cfg.height // 8, cfg.width // 8
    p = cfg.transformer
    out = {
        "latents": mx.random.normal((1, h, w, 16), key=k[0]), "noise": mx.random.normal((1, h, w, 16), key=k[1]),
        "txt": mx.random.normal((1, cfg.txt_tokens, p.context_dim), key=k[2]).astype(dtype),
        "pooled": mx.random.normal((1, p.vec_dim), key=k[3]).astype(dtype), "sigmas": mx.array([0.6]),
    }
    mx.eval(out)
    return out


def step_fn(t: FluxTransformer, compiled: bool):
    opt = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4, bias_correction=True)
    value_and_grad = loss_and_grad(t)

    def step(b):
        loss, grads = value_and_grad(**b)
        opt.update(t, grads)
        return loss

    if compiled:
        opt.init(t.trainable_parameters())  # the state's structure must not change between calls
        state = [t.state, opt.state]
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return lambda b: mx.eval(step(b), t.trainable_parameters(), opt.state)


def measure(cfg, base, rank, args) -> dict:
    t = build(cfg, base, rank, args.targets, args.grad_checkpoint)
    b = batch(cfg, t.img_in.weight.dtype)
    run = step_fn(t, args.compile)
    for _ in range(args.warmup):
        run(b)
    mx.reset_peak_memory()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run(b)
        times.append(time.perf_counter() - start)
    return {"base": base, "rank": rank, "s_per_step": sorted(times)[len(times) // 2],
            "peak_gb": mx.get_peak_memory() / GB}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mid", choices=sorted(configs.CONFIGS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--bases", nargs="+", default=["float32", "8", "4"], help="float32, bfloat16, or bits")
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="mx.compile the whole step")
    ap.add_argument("--grad-checkpoint", action="store_true")
    args = ap.parse_args(argv)
    cfg = configs.get(args.config)
    print(f"config {cfg.name}: {cfg.img_tokens} image + {cfg.txt_tokens} text tokens, targets {args.targets}, "
          f"device {mx.default_device()}, compile {args.compile}, grad checkpoint {args.grad_checkpoint}")
    print(f"{'base':>8} {'rank':>4} {'s/step':>8} {'peak GB':>8}")
    for base in args.bases:
        for rank in args.ranks:
            r = measure(cfg, base, rank, args)
            print(f"{r['base']:>8} {r['rank']:>4} {r['s_per_step']:>8.2f} {r['peak_gb']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
