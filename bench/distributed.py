"""Tensor-parallel cost: bytes all-reduced per step, step time on 1 vs 2 ranks here, and an estimate for 2 and
4 Apple-silicon machines over Thunderbolt 5 and 10 GbE.

    python -m bench.distributed [--config mid] [--steps 2] [--out /tmp/bench_distributed.md]

- Bytes per step are computed from the shapes (`flux_1.parallel.tensor.all_reduce_bytes`: 4 sums per double
  block, 1 per single block, plus the modulations' small ones) and measured by the sharded blocks' counter
  on the 2-rank run; the two must agree.
- Step time: one transformer call (random weights: the values do not change the cost) of the config,
  float32 on this machine's CPU, in one process, then on 2 ranks started with `mlx.launch -n 2 --backend
  ring` (loopback). The ring's own bandwidth is measured too (all_sum of 64 MiB).
- Estimate: step(N) = compute / N + ring all-reduce time, with compute from the FLOPs of full FLUX.1 at
  1024x1024 and an assumed achieved rate, and all-reduce = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency
  per sum (no overlap of compute and communication is assumed: MLX's all_sum sits inside the graph).

Workers: `python -m bench.distributed --worker step|link ...` (what the launcher runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "src", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import flux_1  # noqa: E402,F401  (the BLAS before mlx)

# Assumptions of the estimate (say them where the numbers are shown).
LINKS = {  # name: (effective bytes/s of a TCP ring, latency per hop in s)
    "Thunderbolt 5 (80 Gb/s nominal, 40 Gb/s assumed effective)": (40e9 / 8, 100e-6),
    "10 GbE (9.4 Gb/s effective)": (9.4e9 / 8, 200e-6),
}
MAC_TFLOPS = {  # achieved bf16 matmul rate of one machine in MLX (assumed)
    "M-series Max-class GPU (~7 TFLOPS achieved)": 7e12,
    "M-series Ultra-class GPU (~14 TFLOPS achieved)": 14e12,
}


def step_flops(params, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer call: per block 2 S (4 D^2 + 2 D M) for the linears (every block does
    q, k, v, out and a 2-layer MLP per token) and 4 S^2 D for attention (QK^T and AV)."""
    S, D, M = image_tokens + text_tokens, params.hidden_size, params.mlp_hidden
    blocks = params.depth + params.depth_single
    return blocks * (2 * S * (4 * D * D + 2 * D * M) + 4 * S * S * D)


def ring_seconds(nbytes: float, calls: int, ranks: int, bandwidth: float, latency: float) -> float:
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + calls * 2 * (ranks - 1) * latency


# -- workers (one per rank) -----------------------------------------------------------------------------


def worker_step(config: str, steps: int) -> dict:
    """Build the config's transformer (sharded when launched), time `steps` calls after one warm-up."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bench.configs import CONFIGS
    from flux_1.models.transformer import FluxTransformer
    from flux_1.parallel import world
    from flux_1.parallel.tensor import Reducer, check_split, shard_plan, shard_skeleton
    from flux_1.pipeline import sampler

    cfg = CONFIGS[config]
    params = cfg.transformer
    group = world()
    model = FluxTransformer(params)  # lazy: only what is evaluated below takes memory
    reducer = None
    if group is not None:
        check_split(params, group.size())
        reducer = Reducer(group)
        shard_skeleton(model, shard_plan(params), group.rank(), group.size(), reducer)
    mx.eval(model.parameters())
    key = mx.random.key(0)
    img = mx.random.normal((1, cfg.img_tokens, params.in_channels), key=key)
    txt = mx.random.normal((1, cfg.txt_tokens, params.context_dim), key=key)
    pooled = mx.random.normal((1, params.vec_dim), key=key)
    img_ids, txt_ids = sampler.image_ids(cfg.height, cfg.width), sampler.text_ids(cfg.txt_tokens)
    guidance = mx.array([3.5]) if params.guidance_embed else None
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(img, txt, pooled, mx.array([0.5]), img_ids, txt_ids, guidance=guidance)
        mx.eval(out)
        if i:
            times.append(time.perf_counter() - t0)
        if i == 0 and reducer is not None:
            per_step = {"all_sums": reducer.calls, "bytes": reducer.bytes}
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    result = {"ranks": 1 if group is None else group.size(), "step_s": times, "weights_bytes": weights}
    if reducer is not None:
        result.update(per_step)
    return result


def worker_link(mib: int = 64, repeats: int = 5) -> dict:
    import mlx.core as mx

    from flux_1.parallel import world

    group = world()
    x = mx.ones((mib * 2**20 // 4,), dtype=mx.float32)
    mx.eval(mx.distributed.all_sum(x, group=group))
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x, group=group))
    seconds = (time.perf_counter() - t0) / repeats
    # A 2-rank ring all-reduce moves 2 (N-1)/N = 1 x the buffer each way per rank.
    return {"bytes": x.nbytes, "seconds": seconds, "bus_bytes_per_s": x.nbytes / seconds}


# -- driver ---------------------------------------------------------------------------------------------


def launch(*args: str, ranks: int = 2) -> dict:
    from bench.common import free_ports

    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)),
           "--python", sys.executable, "--", "-m", "bench.distributed", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={
        **os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"the {ranks}-rank run failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[0])


def report(config: str, one: dict, two: dict, link: dict) -> str:
    from bench.common import cpu_name, loadavg
    from bench.configs import CONFIGS
    from flux_1.models.transformer import FluxParams
    from flux_1.parallel.tensor import all_reduce_bytes

    cfg = CONFIGS[config]
    mid = all_reduce_bytes(cfg.transformer, cfg.img_tokens, cfg.txt_tokens, itemsize=4)
    full = all_reduce_bytes(FluxParams(), 4096, 512, itemsize=2)
    flops_full = step_flops(FluxParams(), 4096, 512)
    t1, t2 = min(one["step_s"]), min(two["step_s"])
    rate_here = step_flops(cfg.transformer, cfg.img_tokens, cfg.txt_tokens) / t1
    lines = [
        "# Tensor-parallel generation (issue #13)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, shared with other work (load average "
        f"{loadavg()}): the 2-rank run puts two processes on the same 2 cores, so it measures the "
        "communication overhead, not a speed-up.",
        "",
        "## Bytes all-reduced per denoising step",
        "",
        "| shapes | sums per step | activations | modulation | total |",
        "|---|---|---|---|---|",
        f"| `{config}` ({cfg.width}x{cfg.height}, {cfg.txt_tokens} text tokens, float32), computed | {mid['calls']} | "
        f"{mid['activations'] / 2**20:,.1f} MiB | {mid['modulation'] / 2**20:,.2f} MiB | "
        f"{mid['total'] / 2**20:,.1f} MiB |",
        f"| `{config}`, measured (counted in the sharded blocks, 2 ranks) | {two['all_sums']} | | | "
        f"{two['bytes'] / 2**20:,.1f} MiB |",
        f"| FLUX.1 19 + 38 blocks, 1024x1024 (4096 + 512 tokens), bfloat16, computed | {full['calls']} | "
        f"{full['activations'] / 2**30:,.2f} GiB | {full['modulation'] / 2**20:,.2f} MiB | "
        f"{full['total'] / 2**30:,.2f} GiB |",
        "",
        "Each sum is B x S x D x itemsize (S: the stream's tokens, D = 3072); the ring all-reduce moves "
        "2 (N-1)/N of it in and out of each rank. The modulations' sums are one token wide.",
        "",
        f"## Step time here (`{config}`, one transformer call, float32, CPU)",
        "",
        "| ranks | step (min of runs) | transformer weights per rank |",
        "|---|---|---|",
        f"| 1 | {t1:.2f} s | {one['weights_bytes'] / 2**30:.2f} GiB |",
        f"| 2 (`mlx.launch -n 2 --backend ring`, loopback) | {t2:.2f} s | {two['weights_bytes'] / 2**30:.2f} GiB |",
        "",
        f"Ring bandwidth over loopback here: all_sum of {link['bytes'] / 2**20:.0f} MiB in "
        f"{link['seconds'] * 1e3:.0f} ms "
        f"= {link['bus_bytes_per_s'] / 1e9:.2f} GB/s. Achieved compute here: {rate_here / 1e9:.0f} GFLOP/s "
        "(1 rank).",
        "",
        "## Estimate: FLUX.1 at 1024x1024, bfloat16, one step",
        "",
        f"Compute {flops_full / 1e12:.0f} TFLOP per step (`step_flops`). Assumed: the achieved rate of one "
        "machine below; Thunderbolt 5 at 40 Gb/s effective for MLX's TCP ring (half the nominal 80 Gb/s, as "
        "Thunderbolt bridges measure about half their nominal rate in iperf), 100 us per hop; 10 GbE at 9.4 "
        "Gb/s, 200 us per hop; no overlap of compute and communication.",
        "",
        "| machine | link | 1 machine | 2 machines | 4 machines |",
        "|---|---|---|---|---|",
    ]
    for mac, rate in MAC_TFLOPS.items():
        compute = flops_full / rate
        for link_name, (bandwidth, latency) in LINKS.items():
            cells = []
            for n in (1, 2, 4):
                step = compute / n + ring_seconds(full["total"], full["calls"], n, bandwidth, latency)
                cells.append(f"{step:.1f} s" + (f" ({compute / step:.2f}x)" if n > 1 else ""))
            lines.append(f"| {mac} | {link_name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Memory per machine: the transformer is 23.8 GB in bfloat16; about 1/N of it per rank (the embedders "
        "and final layer, 0.3% of it, are replicated): 11.9 GB each on 2 machines (6.3 GB at -q 8), 6 GB each "
        "on 4. Text encoders and VAE are replicated on every rank and freed before the transformer loads, so "
        "T5-XXL (9.5 GB in bfloat16, about 5 GB at -q 8) sets the peak from 3 machines on.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_distributed.md"))
    p.add_argument("--worker", choices=("step", "link"))
    args = p.parse_args()
    if args.worker:
        import mlx.core as mx

        result = worker_step(args.config, args.steps) if args.worker == "step" else worker_link()
        from flux_1.parallel import world

        group = world()
        if group is None or group.rank() == 0:
            print(json.dumps(result), flush=True)
        if group is not None:  # leave together
            mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
        return
    one = worker_step(args.config, args.steps)
    print(f"1 rank: {one['step_s']}", file=sys.stderr)
    import mlx.core as mx

    mx.clear_cache()  # the 1-rank model is gone: the 2 ranks get the memory
    two = launch("--worker", "step", "--config", args.config, "--steps", str(args.steps))
    print(f"2 ranks: {two['step_s']}", file=sys.stderr)
    link = launch("--worker", "link")
    text = report(args.config, one, two, link)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
