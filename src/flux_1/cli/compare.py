"""`flux1-compare` / `python compare.py`: one prompt and one seed at several LoRA strengths, side by side.

Strength s multiplies every LoRA's base scale (`--lora-scales`, 1.0 each by default): the scales applied
for s are `[s * base_i]`, so strength 0 is the model without its LoRAs (the LoRA side path adds exactly
zero) and strength 1 is what `flux1-generate --lora-scales ...` would draw. The model and the LoRAs are
loaded once; each strength only changes the live LoRA scales (`Flux1.set_lora_scales`) and runs the same
seed again. Written to `--output-dir`:

- `strength_{s}.png` per strength (`strength_0.png`, `strength_0.5.png`, ...), each with the usual
  metadata (the LoRAs with the scales applied for that strength);
- `grid.png`: the images in the order given, at most 4 per row, each under a caption strip
  ("strength 0.5"), below a header naming the LoRAs (with their base scales) and the seed; it carries
  an A1111 `parameters` text chunk (with the strengths) and a `flux_1` JSON chunk too.

Existing files are never overwritten (`_1`, `_2`, ... is added), as with `flux1-generate`. The checks
of `flux1-generate` run before anything is loaded, plus the ones of this command (at least one LoRA,
LoRA files read and resolved, finite and distinct strengths).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..pipeline.flux1 import Config
from ..pipeline.variants import VARIANTS
from .errors import user_errors
from .main import (
    add_lora_arguments,
    add_model_arguments,
    check_args,
    check_inputs,
    check_lora_files,
    check_model_folder,
    check_output_folder,
    flag_names,
    format_bytes,
    make_config,
    model_in_channels,
    print_backend,
    resolve_gguf_args,
)

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0)
DEFAULT_OUTPUT_DIR = "comparison"
GRID_NAME = "grid.png"
MAX_COLUMNS = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def build_parser() -> argparse.ArgumentParser:
    # The model / generation / LoRA flags mean what they mean for flux1-generate (same types, choices,
    # defaults and checks); --seed takes one value and --output-dir replaces --output.
    p = argparse.ArgumentParser(
        description="Compare LoRA strengths with FLUX.1 (MLX): one image per strength from one model load "
        "and one seed, plus a labelled grid.",
        epilog="Strength s applies each LoRA at s times its --lora-scales value; 0 is the image without the "
        "LoRAs. Writes strength_{s}.png for each strength and grid.png to --output-dir, never overwriting "
        "(_1, _2, ... is added).",
    )
    add_model_arguments(p)
    add_lora_arguments(p, "base scale of each LoRA, multiplied by each strength (default 1.0 each)",
                       "LoRA .safetensors files (at least one)")
    p.add_argument("--strengths", nargs="+", type=float, default=list(DEFAULT_STRENGTHS), metavar="S",
                   help="strengths to compare, one image each, in this order (default 0 0.5 1; 0 = no LoRA)")
    p.add_argument("--seed", type=int, help="the seed of every image (default: random, printed and stored)")
    p.add_argument("--output-dir", "-o", type=Path, default=Path(DEFAULT_OUTPUT_DIR),
                   help=f"folder for strength_{{s}}.png and grid.png, created if needed "
                   f"(default {DEFAULT_OUTPUT_DIR}/)")
    return p


# -- checks before loading -----------------------------------------------------------------------------


def strength_label(s: float) -> str:
    """The shortest text that reads back as `s`: 0, 0.5, 1, 1.5, -0.25, 1e-05 (never `1.0` or `-0`)."""
    s = float(s) + 0.0  # -0.0 -> 0.0
    short = f"{s:g}"
    return short if float(short) == s else repr(s)


def check_compare_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.lora_paths:
        parser.error("no LoRA to compare: give at least one file with --lora-paths")
    # flux1-generate's checks (prompt, steps, size, seed range, LoRA files, scale count) take a seed list.
    seeds = None if args.seed is None else [args.seed]
    check_args(parser, argparse.Namespace(**{**vars(args), "seed": seeds}))
    seen: set[str] = set()
    for s in args.strengths:
        if not math.isfinite(s):
            parser.error(f"--strengths {s} is not a finite number")
        label = strength_label(s)
        if label in seen:
            parser.error(f"--strengths {label} is given twice")
        seen.add(label)
    if args.output_dir.suffix.lower() == ".png":
        parser.error(f"--output-dir {args.output_dir} names a .png file: give the folder for the images")


# -- the grid ----------------------------------------------------------------------------------------------


def font_size(cell_width: int) -> int:
    return max(10, min(64, cell_width // 24))


def caption_height(cell_width: int) -> int:
    """Height of the caption strip above each image (and of each header line) for images this wide."""
    return font_size(cell_width) * 8 // 5 + 2


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` (FreeType), or its fixed-size bitmap font where that is unavailable."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _drawable(draw: ImageDraw.ImageDraw, text: str, font) -> str:
    """`text`, with what the (bitmap fallback) font cannot encode replaced by `?`."""
    try:
        draw.textlength(text, font=font)
        return text
    except UnicodeEncodeError:
        return text.encode("latin-1", "replace").decode("latin-1")


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _draw_line(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font, center: bool):
    """`text` vertically centred in `box` (left, top, right, bottom), centred or left-aligned."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 6)
    x = left + max(pad, (right - left - (x1 - x0)) // 2) - x0 if center else left + pad - x0
    y = top + (bottom - top - (y1 - y0)) // 2 - y0
    draw.text((x, y), text, fill=TEXT_COLOR, font=font)


def make_grid(images: list[Image.Image], captions: list[str], header: str,
              columns: int = MAX_COLUMNS) -> Image.Image:
    """Images side by side (`columns` per row at most), each under its caption strip, below a header.

    Layout, with w x h the (common) image size and c = caption_height(w): width columns * w (fewer
    columns when there are fewer images), height k * c + rows * (c + h) for a header of k wrapped lines.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"make_grid: {len(images)} image(s) for {len(captions)} caption(s)")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"make_grid: images differ in size: {sorted({im.size for im in images})}")
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    cap = caption_height(w)
    font = load_font(font_size(w))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = _drawable(measure, header, font)
    header_lines = wrap_text(measure, header, font, cols * w - 4)
    top = len(header_lines) * cap

    grid = Image.new("RGB", (cols * w, top + rows * (cap + h)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(header_lines):
        _draw_line(draw, (0, i * cap, cols * w, (i + 1) * cap), line, font, center=False)
    for i, (im, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * w, top + (i // cols) * (cap + h)
        strip = Image.new("RGB", (w, cap), BACKGROUND)  # drawn apart: a long caption is cut at its cell
        strip_draw = ImageDraw.Draw(strip)
        _draw_line(strip_draw, (0, 0, w, cap), _drawable(strip_draw, caption, font), font, center=True)
        grid.paste(strip, (x, y))
        grid.paste(im.convert("RGB"), (x, y + cap))
    return grid


def save_grid(grid: Image.Image, path: Path, parameters: str, meta: dict) -> Path:
    """Write the grid PNG atomically with its text chunks; never overwrites (returns the name used)."""
    from ..pipeline.metadata import JSON_KEY, PARAMETERS_KEY, _temp_file, publish, to_json

    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(JSON_KEY, to_json(meta))  # no NaN: a clean ValueError before anything is written
    tmp = _temp_file(path.parent, path.name)
    try:
        grid.save(tmp, format="PNG", pnginfo=info)
        return publish(tmp, path, overwrite=False)
    finally:
        tmp.unlink(missing_ok=True)


def lora_summary(loras: list[dict]) -> str:
    from ..pipeline.metadata import format_number, lora_label

    return ", ".join(f"{lora_label(lora)} x{format_number(float(lora.get('scale', 1.0)))}" for lora in loras)


def grid_metadata(first_meta: dict, base_loras: list[dict], strengths: list[float], files: list[Path],
                  grid_size: tuple[int, int], columns: int) -> tuple[str, dict]:
    """(A1111 `parameters` text, `flux_1` JSON object) of the grid: the settings shared by its images,
    the LoRAs at their base scales, and the strengths."""
    from ..pipeline.metadata import a1111_parameters

    loras = [{**entry, "scale": float(lora.get("scale", 1.0))}
             for entry, lora in zip(first_meta["loras"], base_loras, strict=True)]
    meta = {**first_meta, "loras": loras, "timings": {}}
    meta["comparison"] = {
        "strengths": [float(s) + 0.0 for s in strengths],
        "images": [p.name for p in files],
        "columns": columns,
        "rows": math.ceil(len(files) / columns),
        "grid_width": grid_size[0],
        "grid_height": grid_size[1],
    }
    labels = ", ".join(strength_label(s) for s in strengths)
    parameters = f"{a1111_parameters(meta)}, LoRA strengths: {json.dumps(labels)}"
    return parameters, meta


# -- generation ------------------------------------------------------------------------------------


def compare(args: argparse.Namespace, config: Config) -> tuple[list[Path], Path]:
    import mlx.core as mx

    from ..pipeline.flux1 import Flux1

    base = list(args.lora_scales) if args.lora_scales is not None else [1.0] * len(args.lora_paths)
    if args.path is None:
        print(f"Loading {VARIANTS[args.model].repo_id} (Hugging Face cache)")
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    # The side path (no merge): every strength, 0 included, is exact against the untouched base weights.
    flux = Flux1.from_alias(args.model, path=args.path, quantize=args.quantize,
                            transformer_gguf=args.transformer_gguf, t5_gguf=args.t5_gguf,
                            lora_paths=args.lora_paths, lora_scales=base,
                            precision=args.precision, low_memory=True, lora_merge=False)
    base_loras = flux.lora_info()
    if args.verbose:
        print(f"load: {time.perf_counter() - t0:.2f} s, peak memory {format_bytes(mx.get_peak_memory())}")

    images, written = [], []
    for s in args.strengths:
        flux.set_lora_scales([s * b + 0.0 for b in base])  # + 0.0: no -0 in the metadata
        print(f"Generating strength {strength_label(s)} (LoRA scales: {lora_summary(flux.lora_info())}), "
              f"seed {args.seed}")
        mx.reset_peak_memory()
        with flag_names():
            image = flux.generate_image(seed=args.seed, prompt=args.prompt, config=config)
        if args.verbose:
            stages = ", ".join(f"{name.replace('_', ' ')}: {t:.2f} s" for name, t in image.timings.items())
            print(f"{stages}, peak memory {format_bytes(mx.get_peak_memory())}")
        path = image.save(args.output_dir / f"strength_{strength_label(s)}.png", overwrite=False)
        print(f"Saved {path}")
        images.append(image)
        written.append(path)

    captions = [f"strength {strength_label(s)}" for s in args.strengths]
    header = f"LoRA: {lora_summary(base_loras)} | seed {args.seed}"
    grid = make_grid([im.image for im in images], captions, header)
    parameters, meta = grid_metadata(images[0].metadata(), base_loras, args.strengths, written, grid.size,
                                     min(MAX_COLUMNS, len(images)))
    grid_path = save_grid(grid, args.output_dir / GRID_NAME, parameters, meta)
    print(f"Saved {grid_path}")
    return written, grid_path


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_compare_args(parser, args)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    with user_errors():
        if args.verbose:
            print_backend()
        check_output_folder(args.output_dir / GRID_NAME)
        config = make_config(args)
        gguf_files = resolve_gguf_args(args)
        if args.path is not None:
            check_model_folder(args.path, gguf_files)
        widened = check_lora_files(args.lora_paths, args.lora_scales, args.model, args.path, args.precision,
                                   gguf_files)
        check_inputs(config, args.model, widened or model_in_channels(args.model, args.path, gguf_files), True,
                     args.precision)
        compare(args, config)


if __name__ == "__main__":
    main()
