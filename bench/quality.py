"""Image quality of quantized / GGUF / saved / LoRA'd models against a reference: SSIM and PSNR.

`python -m bench.quality --model dev --path REF [reference flags] --candidate "q8:-q 8" \
    --candidate "q4k:--transformer-gguf flux1-dev-Q4_K_S.gguf" --prompts "a" "b" --seeds 1 2 \
    --steps 20 --width 1024 --height 1024 --output-dir DIR`

Every model draws the same prompts, seeds and initial latents: the latents are drawn once per seed
(`sampler.initial_noise(seed, H, W, float32)`, exactly what the pipeline draws for that seed at
float32) and passed as `latents=`, so a bfloat16 or quantized model starts from the same numbers as the
reference. Models are loaded one at a time, the reference first, each freed before the next.

Model flags are flux1-generate's own (`flux_1.cli.main.add_model_arguments` / `add_lora_arguments`, the
same argparse pieces, so they mean the same): the reference takes them directly on this command line
(`--path`, `--transformer-gguf`, `--t5-gguf`, `-q`, `--precision`, `--lora-paths`, `--lora-scales`);
a candidate is `LABEL:FLAGS`, whose flags are ADDED to the reference's (a later flag wins), so
`"q8:-q 8"` is the reference's model quantized to 8 bits and `"saved:--path OUT"` another folder. Sampling
flags (`--steps`, `--width`, `--height`, `--guidance`) belong to this command and are shared by all.

Metrics per image, of the candidate's uint8 RGB against the reference's: SSIM from scikit-image
(`structural_similarity(channel_axis=-1, data_range=255)`: 7x7 uniform window, per channel, averaged),
PSNR from scikit-image (`peak_signal_noise_ratio(data_range=255)`; infinite for identical images,
written as null with `"identical": true`), and the mean / max absolute pixel difference (levels of 255).
Written to `--output-dir` (files overwritten on a re-run):

- `LABEL/p{i}_seed{s}.png`: every image, with the usual PNG metadata (`latents: given`);
- `grid.png`: one row per prompt and seed, reference | candidates, each captioned with its label and,
  for candidates, SSIM / PSNR;
- `quality.json` (settings, each model's flags, load time and quantization, per-image metrics, means) and
  `quality.md` (the same as tables).

scikit-image is the `bench` extra: `pip install -e .[bench]` (or `pip install scikit-image`).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python bench/quality.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402,F401  (sys.path for flux_1 in a plain checkout)

# Model-defining flags (dests of add_model_arguments / add_lora_arguments): what a candidate may change.
MODEL_DESTS = ("model", "path", "transformer_gguf", "t5_gguf", "quantize", "precision", "lora_paths", "lora_scales")
SHARED_DESTS = {"steps": "--steps", "height": "--height", "width": "--width", "guidance": "--guidance"}
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
DEFAULT_SIZE = 1024


class QualityError(Exception):
    """A bad command line (candidate spec, flags): one line, exit status 2."""


# -- command line ------------------------------------------------------------------------------------------


def model_parser() -> argparse.ArgumentParser:
    """flux1-generate's model flags, exactly (its own argparse pieces)."""
    from flux_1.cli.main import add_lora_arguments, add_model_arguments

    p = argparse.ArgumentParser(prog="model flags", add_help=False, exit_on_error=False)
    add_model_arguments(p)
    add_lora_arguments(p, "one strength per LoRA path (default 1.0 each)")
    return p


def parse_model_flags(tokens: list[str], model: str, what: str) -> dict:
    """Model flags -> `Flux1.from_alias` keywords (plus `model`), checked as flux1-generate checks them."""
    p = model_parser()
    defaults = vars(p.parse_args(["--model", model, "--prompt", "x"]))
    try:
        args, extra = p.parse_known_args(["--model", model, "--prompt", "x", *tokens])
    except (argparse.ArgumentError, SystemExit) as e:  # SystemExit: argparse's own exit on a bad value
        raise QualityError(f"{what}: bad flags {shlex.join(tokens)!r}: {e}") from None
    if extra:
        raise QualityError(f"{what}: unknown flag(s) {shlex.join(extra)!r} (model flags only: --path, "
                           "--transformer-gguf, --t5-gguf, -q, --precision, --lora-paths, --lora-scales, --model)")
    values = vars(args)
    for dest, value in values.items():
        if dest in MODEL_DESTS or dest == "prompt" or value == defaults[dest]:
            continue
        flag = SHARED_DESTS.get(dest)
        raise QualityError(f"{what}: {flag or '--' + dest.replace('_', '-')} is not a model flag"
                           + (": give it to bench.quality itself, it is shared by all models" if flag else ""))
    if values["lora_scales"] is not None and not values["lora_paths"]:
        raise QualityError(f"{what}: --lora-scales given without --lora-paths")
    return {k: values[k] for k in MODEL_DESTS}


def parse_candidate(text: str) -> tuple[str, list[str]]:
    label, sep, flags = text.partition(":")
    label = label.strip()
    if not sep or not LABEL_RE.match(label):
        raise QualityError(f"--candidate {text!r}: give LABEL:FLAGS (a label of letters, digits, . _ + -; "
                           "then the model flags, possibly none), e.g. \"q8:-q 8\"")
    try:
        return label, shlex.split(flags)
    except ValueError as e:
        raise QualityError(f"--candidate {text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="SSIM / PSNR of candidate models against a reference model, same prompts, seeds and "
        "initial latents; writes the images, a labelled grid, quality.json and quality.md.",
        epilog="Any other flag is a reference model flag of flux1-generate (--path, --transformer-gguf, "
        "--t5-gguf, -q, --precision, --lora-paths, --lora-scales). A candidate's flags are added to the "
        "reference's (a later flag wins).",
    )
    p.add_argument("--model", "-m", required=True, help="model alias (schnell, dev, ...), as for flux1-generate")
    p.add_argument("--candidate", "-c", action="append", default=[], metavar="LABEL:FLAGS", required=True,
                   help='a model to compare, e.g. "q8:-q 8", "q4k:--transformer-gguf f.gguf", "saved:--path OUT" '
                   '(repeat for several)')
    p.add_argument("--reference-label", default="reference", help="the reference's label (default: reference)")
    p.add_argument("--prompts", nargs="+", required=True, metavar="P")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="default: 0")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 16 (default {DEFAULT_SIZE})")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default {DEFAULT_SIZE})")
    p.add_argument("--guidance", type=float, help="distilled guidance (default: the model's)")
    p.add_argument("--output-dir", "-o", type=Path, default=Path("quality"), help="default: quality/")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args, ref_tokens = p.parse_known_args(argv)
    try:
        args.reference = parse_model_flags(ref_tokens, args.model, "reference")
        args.reference_flags = ref_tokens
        cands, seen = [], {args.reference_label}
        if not LABEL_RE.match(args.reference_label):
            raise QualityError(f"--reference-label {args.reference_label!r}: letters, digits, . _ + - only")
        for text in args.candidate:
            label, flags = parse_candidate(text)
            if label in seen:
                raise QualityError(f"--candidate {text!r}: label {label!r} is used twice")
            seen.add(label)
            cands.append({"label": label, "flags": flags,
                          "kwargs": parse_model_flags([*ref_tokens, *flags], args.model, f"candidate {label!r}")})
        args.candidates = cands
        for name in ("height", "width"):
            v = getattr(args, name)
            if v is not None and (v < 16 or v % 16):
                raise QualityError(f"--{name} {v}: give a multiple of 16, at least 16")
        if args.steps is not None and args.steps < 1:
            raise QualityError(f"--steps must be at least 1, got {args.steps}")
        if len(set(args.seeds)) != len(args.seeds):
            raise QualityError("--seeds: a seed is given twice")
    except QualityError as e:
        p.error(str(e))
    return args


# -- metrics -----------------------------------------------------------------------------------------------


def metrics(ref, img) -> dict:
    """SSIM and PSNR (scikit-image) and absolute pixel differences of two (H, W, 3) uint8 images."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, img = np.asarray(ref), np.asarray(img)
    if ref.shape != img.shape:
        raise ValueError(f"images differ in shape: {ref.shape} vs {img.shape}")
    diff = np.abs(ref.astype(np.int16) - img.astype(np.int16))
    identical = not diff.any()
    ssim = float(structural_similarity(ref, img, channel_axis=-1, data_range=255))
    psnr = None if identical else float(peak_signal_noise_ratio(ref, img, data_range=255))
    return {"ssim": ssim, "psnr_db": psnr, "identical": identical,
            "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max())}


def summarize(rows: list[dict]) -> dict:
    ssim = [r["ssim"] for r in rows]
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    return {
        "mean_ssim": sum(ssim) / len(ssim),
        "min_ssim": min(ssim),
        # identical images (infinite PSNR) are left out of the mean; all identical: null
        "mean_psnr_db": sum(finite) / len(finite) if finite else None,
        "identical_images": sum(r["identical"] for r in rows),
        "mean_abs_diff": sum(r["mean_abs_diff"] for r in rows) / len(rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
    }


# -- running -----------------------------------------------------------------------------------------------


def _free() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def run_model(kwargs: dict, label: str, prompts: list[str], noises: dict, config, out_dir: Path, log=print) -> dict:
    """Load one model, draw every (prompt, seed) from the given latents, save the images, free it."""
    import mlx.core as mx
    import numpy as np

    from flux_1.pipeline.flux1 import Flux1

    kw = {k: v for k, v in kwargs.items() if k != "model"}
    log(f"[{label}] loading {kwargs['model']} ({', '.join(f'{k}={v}' for k, v in kw.items() if v) or 'defaults'})")
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    flux = Flux1.from_alias(kwargs["model"], low_memory=True, progress=False, **kw)
    load_s = time.perf_counter() - t0
    images, files, seconds = {}, {}, []
    folder = out_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    quantization = None
    for i, prompt in enumerate(prompts):
        for seed, noise in noises.items():
            t0 = time.perf_counter()
            image = flux.generate_image(seed=None, prompt=prompt, config=config, latents=noise, progress=False)
            seconds.append(time.perf_counter() - t0)
            quantization = image.quantization
            path = image.save(folder / f"p{i}_seed{seed}.png", overwrite=True)
            images[(i, seed)] = np.asarray(image.image.convert("RGB"))
            files[(i, seed)] = str(path)
            log(f"[{label}] prompt {i}, seed {seed}: {seconds[-1]:.1f} s -> {path}")
    info = {"load_s": load_s, "image_s": seconds, "peak_gb": mx.get_peak_memory() / 1e9,
            "precision": flux.precision, "quantization": quantization,
            "gguf_files": {k: str(v) for k, v in (flux.gguf_files or {}).items()}}
    del flux
    _free()
    return {"images": images, "files": files, "info": info}


def _jsonable(kwargs: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}


def evaluate(args: argparse.Namespace, log=print) -> dict:
    """Run the reference and every candidate; returns the report (also written to --output-dir)."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from flux_1.cli.compare import make_grid
    from flux_1.pipeline.flux1 import Config
    from flux_1.pipeline.sampler import initial_noise

    from .common import cpu_name, loadavg

    try:  # fail before any model loads
        import skimage  # noqa: F401
    except ImportError:
        raise SystemExit("bench.quality needs scikit-image: pip install -e .[bench] "
                         "(or pip install scikit-image)") from None
    height, width = args.height or DEFAULT_SIZE, args.width or DEFAULT_SIZE
    config = Config(num_inference_steps=args.steps, height=height, width=width, guidance=args.guidance)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # One draw per seed, float32, as the pipeline draws it at float32; every model starts from these numbers.
    noises = {s: np.asarray(initial_noise(s, height, width, mx.float32)) for s in args.seeds}
    load0 = loadavg()
    t_start = time.perf_counter()

    ref = run_model(args.reference, args.reference_label, args.prompts, noises, config, out, log)
    ref_images = ref.pop("images")
    report = {
        "tool": "python -m bench.quality",
        "argv": sys.argv[1:],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "device": str(mx.default_device()), "mlx": mx.__version__,
                    "load_average_start": load0},
        "model": args.model, "prompts": args.prompts, "seeds": args.seeds,
        "steps": args.steps, "height": height, "width": width, "guidance": args.guidance,
        "latents": "sampler.initial_noise(seed, height, width, float32), the same for every model",
        "ssim": "skimage.metrics.structural_similarity(channel_axis=-1, data_range=255)",
        "psnr": "skimage.metrics.peak_signal_noise_ratio(data_range=255); null when identical",
        "reference": {"label": args.reference_label, "flags": args.reference_flags,
                      "kwargs": _jsonable(args.reference), **ref["info"],
                      "files": [ref["files"][k] for k in sorted(ref["files"])]},
        "candidates": [],
    }
    cand_images = {}
    for cand in args.candidates:
        res = run_model(cand["kwargs"], cand["label"], args.prompts, noises, config, out, log)
        per_image = []
        for (i, seed), img in sorted(res["images"].items()):
            m = metrics(ref_images[(i, seed)], img)
            per_image.append({"prompt_index": i, "seed": seed, **m, "file": res["files"][(i, seed)]})
        cand_images[cand["label"]] = res["images"]
        summary = summarize(per_image)
        report["candidates"].append({"label": cand["label"], "flags": cand["flags"],
                                     "kwargs": _jsonable(cand["kwargs"]), **res["info"], **summary,
                                     "images": per_image})
        psnr = summary["mean_psnr_db"]
        log(f"[{cand['label']}] mean SSIM {summary['mean_ssim']:.4f}, mean PSNR "
            f"{'inf' if psnr is None else f'{psnr:.2f}'} dB")
    report["machine"]["load_average_end"] = loadavg()
    report["total_s"] = time.perf_counter() - t_start

    # The grid: a row per (prompt, seed), reference | candidates.
    cells, captions = [], []
    by_label = {c["label"]: {(r["prompt_index"], r["seed"]): r for r in c["images"]} for c in report["candidates"]}
    for key in sorted(ref_images):
        i, seed = key
        cells.append(Image.fromarray(ref_images[key]))
        captions.append(f"{args.reference_label} p{i} s{seed}")
        for cand in args.candidates:
            r = by_label[cand["label"]][key]
            cells.append(Image.fromarray(cand_images[cand["label"]][key]))
            psnr = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
            captions.append(f"{cand['label']} {r['ssim']:.4f} / {psnr}")
    prompts = "; ".join(f"p{i}: {p}" for i, p in enumerate(args.prompts))
    seeds = " ".join(map(str, args.seeds))
    header = (f"{args.model}, {args.steps or 'default'} steps, {width}x{height}, seeds {seeds}; {prompts}; "
              "captions: label SSIM / PSNR dB against the first column")
    grid = make_grid(cells, captions, header, columns=1 + len(args.candidates))
    grid_path = out / "grid.png"
    grid.save(grid_path)
    report["grid"] = str(grid_path)
    (out / "quality.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "quality.md").write_text(markdown(report))
    log(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {grid_path}")
    return report


# -- report ------------------------------------------------------------------------------------------------


def _f(x, fmt: str) -> str:
    return "inf" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    ref = report["reference"]
    m = report["machine"]
    lines = [
        f"# Image quality against `{ref['label']}`",
        "",
        f"- model `{report['model']}`, {report['steps'] or 'default'} steps, {report['width']}x{report['height']}, "
        f"seeds {', '.join(map(str, report['seeds']))}, {len(report['prompts'])} prompt(s); same initial latents "
        "for every model",
        f"- reference: `{shlex.join(ref['flags']) or '(defaults)'}` ({ref['precision']})",
        f"- machine: {m['cpu']}, {m['device']}, MLX {m['mlx']}; load average {m['load_average_start']} -> "
        f"{m.get('load_average_end')}; {report['date']}",
        "- SSIM: scikit-image `structural_similarity(channel_axis=-1, data_range=255)`; PSNR: scikit-image "
        "`peak_signal_noise_ratio(data_range=255)` (identical images: infinite, left out of the mean); "
        "|diff|: absolute pixel difference in levels of 255",
        "",
        "| candidate | flags | mean SSIM | min SSIM | mean PSNR dB | mean abs diff | max abs diff | load s "
        "| s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["candidates"]:
        per = sum(c["image_s"]) / len(c["image_s"])
        lines.append(f"| {c['label']} | `{shlex.join(c['flags']) or '(same as reference)'}` | {c['mean_ssim']:.4f} | "
                     f"{c['min_ssim']:.4f} | {_f(c['mean_psnr_db'], '.2f')} | {c['mean_abs_diff']:.3f} | "
                     f"{c['max_abs_diff']} | {c['load_s']:.1f} | {per:.1f} |")
    lines += ["", "Per image:", "", "| candidate | prompt | seed | SSIM | PSNR dB | mean abs diff |",
              "|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        for r in c["images"]:
            lines.append(f"| {c['label']} | p{r['prompt_index']} | {r['seed']} | {r['ssim']:.4f} | "
                         f"{_f(r['psnr_db'], '.2f')} | {r['mean_abs_diff']:.3f} |")
    lines += ["", "Prompts:", ""] + [f"- p{i}: {p}" for i, p in enumerate(report["prompts"])]
    lines += ["", f"Grid: `{report['grid']}` (reference | candidates, one row per prompt and seed)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from flux_1.cli.errors import user_errors

    with user_errors():
        return evaluate(args)


if __name__ == "__main__":
    main()
