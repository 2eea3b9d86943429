"""`python -m bench` / `python bench/run.py`: speed and memory of flux_1, side by side with diffusers.

    python -m bench --config tiny                       # seconds; the CI smoke test runs this
    python -m bench --config mid --quantize none 8 4 --lora-rank 0 16 --steps 2
    python -m bench --config full --precision bfloat16 --quantize none 8 4 --lora-rank 0 16   # a GPU
    python -m bench --config mid --mode txt2img kontext --height 1024 --width 1024   # Kontext beside txt2img

For the named configuration (bench/configs.py) random weights are written to a diffusers-layout
safetensors folder (reused across runs with --weights-dir), then, per precision x quantization x LoRA
rank: load time (the real loader), text encoding, per-step time (median after warm-up), VAE decode,
peak memory per stage. diffusers runs the same folder and inputs in a subprocess (--reference).
--mode kontext times the same step with a reference image's tokens appended to the image tokens (position
ids with first axis 1, as FLUX.1 Kontext), so the sequence is image x 2 + text, and the reference's VAE
encode (`encode`); each mode is a row of its own, beside the others.
A JSON result (--output-json) and a markdown table (--markdown, and stdout) come out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402,F401  (sys.path for flux_1 in a plain checkout)
from bench import configs, report, weights  # noqa: E402
from bench.common import REFERENCE_ENV, cpu_name, loadavg, make_inputs, openblas_preloaded, ours_blas  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = ("txt2img", "kontext")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(configs.CONFIGS))
    p.add_argument("--mode", nargs="+", default=["txt2img"], choices=list(MODES),
                   help="what a step conditions on: txt2img (the image tokens), kontext (plus a reference "
                        "image's as many tokens, ids (1, row, col), as FLUX.1 Kontext); each a row")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the config's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the config's)")
    p.add_argument("--precision", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU (bf16 matmul is slow there), bfloat16 on a GPU")
    p.add_argument("--quantize", nargs="+", default=["none"],
                   help="quantization settings: none, bits (8 4 ...) or a mode (mxfp4 mxfp8 nvfp4)")
    p.add_argument("--lora-rank", nargs="+", type=int, default=[0],
                   help="runtime LoRA ranks on every transformer linear; 0 = no LoRA")
    p.add_argument("--steps", type=int, default=2, help="timed denoising steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (and decodes) first")
    p.add_argument("--no-decode", action="store_true", help="skip the VAE decode (and the VAE stage, "
                   "unless --mode kontext encodes)")
    p.add_argument("--no-encode", action="store_true",
                   help="--mode kontext: skip the reference image's VAE encode")
    p.add_argument("--decode-warmup", type=int, default=None,
                   help="untimed VAE decodes before the timed one (default: --warmup)")
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="where to write (or reuse) the random weights; default: a temp folder, deleted after")
    p.add_argument("--weights-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the safetensors files (the Hub ships bfloat16)")
    p.add_argument("--reference", default="auto", choices=["auto", "on", "off", "only"],
                   help="diffusers side: auto = when torch and diffusers import; only = skip ours")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--max-stage-seconds", type=float, default=None,
                   help="project (not run) a quantized stage predicted to take longer than this; "
                        "default: the config's (mid: 150 s, others: never)")
    p.add_argument("--sample-rows", type=int, default=32,
                   help="rows on which a projected quantized linear is timed (scaled to the real rows)")
    p.add_argument("--profile", action="store_true", help="also time each transformer block separately")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the split of a measured step into linears / attention / GELU / rest (each "
                        "re-timed alone: about one more step's time per row)")
    p.add_argument("--write-weights-only", action="store_true",
                   help="write the random weights to --weights-dir and stop (a separate first command)")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="also N rounds of (our step, diffusers step) alternately, both processes resident "
                        "(diffusers in its own process, torch's own BLAS), first precision, txt2img, no "
                        "LoRA/quantization: the median ours / diffusers ratio and its min-max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def environment() -> dict:
    import mlx.core as mx

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "device": mx.device_info().get("device_name", "?") if hasattr(mx, "device_info") else "?",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "openblas_preloaded": openblas_preloaded(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        **ours_blas(),  # blas (blas_info()), blas_provider, blas_threads, OPENBLAS_NUM_THREADS / OMP_NUM_THREADS
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def reference_available() -> str | None:
    """None when torch + diffusers + transformers import, else why not."""
    try:
        import importlib.util

        for name in ("torch", "diffusers", "transformers"):
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed"
    except Exception as e:  # pragma: no cover
        return str(e)
    return None


def run_reference(args, cfg, root: Path, inputs_path: Path, precisions: list[str], log) -> dict:
    spec = {
        "root": str(root), "inputs": str(inputs_path), "precisions": precisions,
        "ranks": sorted(set(args.lora_rank)), "steps": args.steps, "warmup": args.warmup,
        "decode_warmup": args.warmup if args.decode_warmup is None else args.decode_warmup,
        "decode": not args.no_decode,
        "threads": args.threads, "height": cfg.height, "width": cfg.width,
        "latent_grid": [cfg.height // 16, cfg.width // 16], "guidance": cfg.transformer.guidance_embed,
        "context_dim": cfg.transformer.context_dim, "vec_dim": cfg.transformer.vec_dim,
        "modes": modes(args), "encode": encodes(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        log(f"[diffusers] running in a subprocess ({args.threads} torch threads)")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.reference", str(spec_path), str(out_path)],
                              cwd=str(REPO), capture_output=True, text=True, env=reference_environ())
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            log(f"[diffusers] failed (exit {proc.returncode}):\n{tail}")
            return {"rows": [], "error": f"exit {proc.returncode}: {tail[-500:]}"}
        out = json.loads(out_path.read_text())
        out["wall_s"] = time.perf_counter() - t0
        return out


def run_alternate(args, cfg, root: Path, inputs: dict, inputs_path: Path, precision: str, log) -> dict:
    """N rounds of (our transformer step, diffusers' step), alternately, same inputs (the first step's).
    diffusers runs in a resident subprocess (`bench.reference --serve`) driven over a pipe, so each side
    keeps its own process and BLAS and machine drift hits both alike. Random text embeddings of the
    encoders' shapes (values do not change a step's cost)."""
    import mlx.core as mx
    import numpy as np

    from bench.common import Clock, median
    from flux_1.loading import folder as loader
    from flux_1.pipeline import sampler
    from flux_1.pipeline.flux1 import StepBufferCache

    rng = np.random.default_rng(args.seed + 1)
    txt_np = rng.standard_normal((1, cfg.txt_tokens, cfg.transformer.context_dim)).astype(np.float32)
    pooled_np = rng.standard_normal((1, cfg.transformer.vec_dim)).astype(np.float32)
    np.savez(inputs_path, **inputs, alt_txt=txt_np, alt_pooled=pooled_np)
    spec = {"root": str(root), "inputs": str(inputs_path), "precisions": [precision], "threads": args.threads,
            "latent_grid": [cfg.height // 16, cfg.width // 16], "guidance": cfg.transformer.guidance_embed}
    dtype = getattr(mx, precision)
    ours = loader.load_folder_component(root, "transformer", dtype)
    img_ids, txt_ids = sampler.image_ids(cfg.height, cfg.width), sampler.text_ids(cfg.txt_tokens)
    pe = ours.position_embedding(img_ids, txt_ids)
    x, txt, pooled = (mx.array(a).astype(dtype) for a in (inputs["noise"], txt_np, pooled_np))
    sigma = mx.array([float(inputs["sigmas"][0])])
    guidance = mx.array([3.5]) if cfg.transformer.guidance_embed else None

    def ours_step():
        mx.eval(ours(x, txt, pooled, sigma, img_ids, txt_ids, guidance=guidance, pe=pe))

    # One buffer cache over every round, as over the steps of one generation (Flux1.denoise).
    with tempfile.TemporaryDirectory() as tmp, StepBufferCache() as buffers:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-m", "bench.reference", "--serve", str(spec_path)],
                                cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=reference_environ())
        try:
            ready = json.loads(proc.stdout.readline() or "{}")
            if not ready.get("ready"):
                return {"error": f"diffusers server did not start (exit {proc.poll()})"}

            def ref_step():
                proc.stdin.write("step\n")
                proc.stdin.flush()
                return json.loads(proc.stdout.readline())

            ours_step()
            buffers.step_done()
            ref_step()  # warm-ups
            out = {"rounds": args.alternate, "precision": precision, "ours_s": [], "diffusers_s": [],
                   "ours_others_cores": [], "diffusers_others_cores": [], "reference_env": ready["env"]}
            for i in range(args.alternate):
                with Clock() as c:
                    ours_step()
                d = ref_step()
                out["ours_s"].append(c.s)
                out["ours_others_cores"].append(c.others / c.s if c.others is not None else None)
                out["diffusers_s"].append(d["s"])
                # the resident idle partner counts as "others" for a step: it sleeps on a pipe, ~0
                out["diffusers_others_cores"].append(d["others"] / d["s"] if d["others"] is not None else None)
                log(f"[alternate] round {i + 1}: ours {c.s:.3f} s, diffusers {d['s']:.3f} s")
        finally:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.write("quit\n")
                proc.stdin.close()
            proc.wait(timeout=60)
    ratios = [o / d for o, d in zip(out["ours_s"], out["diffusers_s"], strict=True)]
    out.update(ratio_per_round=ratios, ratio_median=median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    others = [o for o in out["ours_others_cores"] + out["diffusers_others_cores"] if o is not None]
    out["busy"] = bool(others) and max(others) > report.BUSY_OTHERS_CORES
    return out


def reference_environ(base: dict | None = None) -> dict:
    """The diffusers subprocess' environment: torch with its own BLAS. No inherited LD_PRELOAD (an
    OpenBLAS there would take over torch's `sgemm_`), FLUX1_BLAS=off and FLUX1_BENCH_REFERENCE=1 (bench's
    __init__ then does not import flux_1, whose select_blas would load an OpenBLAS RTLD_GLOBAL)."""
    env = dict(os.environ if base is None else base)
    env.pop("LD_PRELOAD", None)
    env["FLUX1_BLAS"] = "off"
    env[REFERENCE_ENV] = "1"
    return env


def modes(args) -> list[str]:
    return [m for m in MODES if m in args.mode]  # txt2img first, each once


def encodes(args) -> bool:
    """Whether the reference image's VAE encode is timed (Kontext's one-off stage)."""
    return "kontext" in args.mode and not args.no_encode


def sized(cfg: configs.BenchConfig, height: int | None, width: int | None) -> configs.BenchConfig:
    """The config at another image size (the weights do not change: bench/weights.py reuses them)."""
    if height is None and width is None:
        return cfg
    h, w = height or cfg.height, width or cfg.width
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise SystemExit(f"--height/--width must be positive multiples of 16, got {h}x{w}")
    return dataclasses.replace(cfg, height=h, width=w)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    cfg = sized(configs.get(args.config), args.height, args.width)
    import mlx.core as mx

    gpu = mx.default_device() != mx.cpu
    precisions = args.precision or (["bfloat16"] if gpu else ["float32"])
    max_stage_s = args.max_stage_seconds if args.max_stage_seconds is not None else cfg.max_stage_seconds
    if max_stage_s is not None and max_stage_s <= 0:
        max_stage_s = 0.0
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    result = {
        "schema": 1,
        "command": command,
        "config": cfg.describe(),
        "settings": {"precisions": precisions, "quantize": args.quantize, "lora_ranks": sorted(set(args.lora_rank)),
                     "modes": modes(args), "encode": encodes(args), "breakdown": not args.no_breakdown,
                     "steps": args.steps, "warmup": args.warmup, "max_stage_seconds": max_stage_s,
                     "sample_rows": args.sample_rows, "weights_dtype": args.weights_dtype,
                     "decode_warmup": args.warmup if args.decode_warmup is None else args.decode_warmup},
        "env": environment(),
        "rows": [],
        "breakdowns": [],
    }
    result["env"]["loadavg_start"] = loadavg()
    from bench import profile

    result["analytic"] = {
        "this_config": profile.step_flops(cfg.transformer, cfg.img_tokens, cfg.txt_tokens),
        **({"this_config_kontext": profile.step_flops(cfg.transformer, 2 * cfg.img_tokens, cfg.txt_tokens)}
           if "kontext" in modes(args) else {}),
        "full_1024": full_model_flops(),
    }

    tmp = None
    root = args.weights_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"flux-bench-{cfg.name}-")
        root = Path(tmp.name)
    t0 = time.perf_counter()
    written = weights.write_folder(cfg, root, args.weights_dtype, args.seed, log=log)
    result["weights"] = {"dir": str(root), "bytes": written["bytes"], "reused": written["reused"],
                         "write_s": time.perf_counter() - t0}
    if args.write_weights_only:
        if args.weights_dir is None:
            raise SystemExit("--write-weights-only needs --weights-dir")
        log(f"weights in {root}: {written['bytes']} bytes, {result['weights']['write_s']:.0f} s")
        return result
    inputs = make_inputs(cfg, args.warmup + args.steps, args.seed, kontext="kontext" in modes(args))
    inputs_path = root / "bench-inputs.npz"
    import numpy as np

    np.savez(inputs_path, **inputs)

    try:
        if args.reference != "only":
            from bench import ours

            rows, bds = ours.run(cfg, root, inputs, precisions, args.quantize, sorted(set(args.lora_rank)),
                                 args.steps, args.warmup, max_stage_s, args.sample_rows, args.profile, log,
                                 decode_warmup=args.decode_warmup, decode=not args.no_decode,
                                 modes=modes(args), encode=encodes(args), breakdown=not args.no_breakdown)
            result["rows"] += rows
            result["breakdowns"] += bds
        why_not = reference_available()
        if args.reference in ("on", "only") or (args.reference == "auto" and why_not is None):
            if why_not is not None:
                raise SystemExit(f"--reference {args.reference}: {why_not}")
            ref = run_reference(args, cfg, root, inputs_path, precisions, log)
            result["reference_env"] = ref.get("env", {})
            if ref.get("error"):
                result["reference_error"] = ref["error"]
            result["rows"] += ref.get("rows", [])
            if args.alternate > 0:
                result["alternate"] = run_alternate(args, cfg, root, inputs, inputs_path, precisions[0], log)
        else:
            result["reference_skipped"] = why_not or "--reference off"
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["env"]["loadavg_end"] = loadavg()
    report.add_ratios(result)
    report.flag_busy(result)
    md = report.markdown(result)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=2, default=_jsonable))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if not args.quiet:
        print(md)
    return result


def full_model_flops() -> dict:
    """FLOPs of one FLUX.1 step at 1024x1024 with 512 T5 tokens, counted two ways: the closed form,
    and from the linear/attention calls the code really makes (a lazily built full model: nothing runs)."""
    import mlx.core as mx

    from bench import profile
    from flux_1.models.transformer import FluxTransformer
    from flux_1.pipeline import sampler

    cfg = configs.get("full")
    closed = profile.step_flops(cfg.transformer, cfg.img_tokens, cfg.txt_tokens)
    model = FluxTransformer(cfg.transformer)  # random init is lazy: never evaluated
    x = mx.zeros((1, cfg.img_tokens, cfg.transformer.in_channels))
    txt = mx.zeros((1, cfg.txt_tokens, cfg.transformer.context_dim))
    pooled = mx.zeros((1, cfg.transformer.vec_dim))
    calls, _ = profile.record_calls(lambda: model(
        x, txt, pooled, mx.array([1.0]), sampler.image_ids(cfg.height, cfg.width), sampler.text_ids(cfg.txt_tokens),
        guidance=mx.array([3.5])))
    recorded = {"linear": calls.linear_flops(), "attention": calls.attention_flops()}
    recorded["total"] = recorded["linear"] + recorded["attention"]
    return {"closed_form": closed, "recorded": recorded, "linear_calls": len(calls.linears),
            "attention_calls": len(calls.attention), "img_tokens": cfg.img_tokens, "txt_tokens": cfg.txt_tokens}


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


if __name__ == "__main__":
    main()
