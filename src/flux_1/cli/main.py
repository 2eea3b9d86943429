"""`flux1-generate` / `python main.py`: images with FLUX.1: text to image, img2img, Kontext, Fill, Canny/Depth.

Everything that can be checked without the model (arguments, numbers, the prompt's encoding, whether
the size fits in memory, the checkpoint's folders and safetensors headers, each LoRA file resolved
against the model's modules) is checked before loading it. The model is loaded once for all seeds, with the
text encoders freed after encoding (`low_memory`). Each image is written atomically with its metadata.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..components import PRECISIONS
from ..lora import lora_strengths
from ..parallel import DEFAULT_TIMEOUT
from ..pipeline.flux1 import MAX_SIDE, MAX_STEPS, Config, check_prompt
from ..pipeline.variants import VARIANTS
from ..quantization import CHOICES
from .errors import CLIError, user_errors

QUANTIZE_CHOICES = CHOICES
DEFAULT_OUTPUT = "flux_{seed}.png"
OUTPUT_FIELDS = ("seed", "model", "steps")
MAX_SEED = 2**64 - 1
EXIT_STOPPED = 143  # 128 + SIGTERM


def parse_quantize(text: str) -> int | str:
    if text not in QUANTIZE_CHOICES:
        choices = ", ".join(QUANTIZE_CHOICES)
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: choose one of {choices}")
    return int(text) if text.isdigit() else text


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        sides = tuple(int(p) for p in parts)
    except ValueError:
        sides = ()
    if len(sides) != 4 or min(sides) < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give 4 pixel counts >= 0 as TOP,RIGHT,BOTTOM,LEFT")
    if not any(sides):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: at least one side must be > 0")
    return sides


# Config field -> flag, to name the culprit in the pipeline's messages the way the user wrote it.
FLAGS = {"control_image_path": "--control-image-path", "image_path": "--image-path", "mask_path": "--mask-path",
         "image_strength": "--image-strength", "outpaint": "--outpaint", "auto_resize=False": "--no-auto-resize"}
_FLAG_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(k) for k in FLAGS) + r")(?![\w])")


def as_flags(message: str) -> str:
    return _FLAG_RE.sub(lambda m: FLAGS[m.group(1)], message)


@contextmanager
def flag_names():
    """Re-raise the pipeline's ValueErrors about inputs with the flags' names instead of Config's."""
    try:
        yield
    except ValueError as e:
        raise CLIError(as_flags(str(e))) from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared by every generating command: model, prompt, folder, sampling, precision."""
    p.add_argument("--model", "-m", required=True, choices=list(VARIANTS),
                   help="schnell (4 steps), dev (25), dev-kontext (28, edits --image-path), dev-fill (50, "
                   "inpaints --image-path under --mask-path or --outpaint), dev-canny / dev-depth (50, follow "
                   "--control-image-path)")
    p.add_argument("--prompt", "-p", required=True, help="the text to draw")
    p.add_argument("--path", type=Path,
                   help="local model folder (diffusers layout, BFL files, a folder holding a transformer .gguf, or "
                   "saved by flux1-save) instead of the Hugging Face Hub; or a transformer .gguf file (the other "
                   "components then come from the Hub)")
    p.add_argument("--transformer-gguf", type=Path, metavar="FILE",
                   help="a FLUX transformer GGUF (city96's) used instead of the model's transformer")
    p.add_argument("--t5-gguf", type=Path, metavar="FILE", help="a T5-XXL encoder GGUF used instead of the model's T5")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 4 for schnell, 25 for dev)")
    for side in ("--height", "--width"):
        p.add_argument(side, type=int,
                       help="pixels, rounded down to a multiple of 16 (default 1024, or the input image's size)")
    p.add_argument("--guidance", type=float,
                   help="distilled guidance (default: the model's, 3.5 for dev); schnell ignores it")
    p.add_argument("--image-path", type=Path, metavar="P",
                   help="input image: img2img start (schnell, dev), the image to edit (dev-kontext) or to fill")
    p.add_argument("--image-strength", type=float, metavar="S",
                   help="img2img: the fraction of the steps skipped, in [0, 1): 0 ignores the image, near 1 "
                   "keeps it (default 0.4; dev-fill 0)")
    p.add_argument("--mask-path", type=Path, metavar="M", help="dev-fill: mask, white is repainted")
    p.add_argument("--outpaint", type=parse_outpaint, metavar="T,R,B,L",
                   help="dev-fill: pixels to add at the top, right, bottom and left (repainted)")
    p.add_argument("--control-image-path", type=Path, metavar="P",
                   help="dev-canny / dev-depth (or dev with a control LoRA): the edge or depth map to follow")
    p.add_argument("--no-auto-resize", dest="auto_resize", action="store_false",
                   help="dev-kontext: keep the image's size (rounded down to multiples of 16) instead of the "
                   "nearest preferred Kontext resolution")
    p.add_argument("-q", "--quantize", type=parse_quantize, metavar="BITS",
                   help=f"quantize while loading: {', '.join(QUANTIZE_CHOICES)}")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="compute dtype (default: float32 on the CPU backend, bfloat16 on a GPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-stage times and peak memory")


def add_lora_arguments(p: argparse.ArgumentParser, scales_help: str,
                       paths_help: str = "LoRA .safetensors files") -> None:
    p.add_argument("--lora-paths", nargs="+", default=[], metavar="P", help=paths_help)
    p.add_argument("--lora-scales", nargs="+", type=float, metavar="S", help=scales_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate images with FLUX.1 (MLX).",
        epilog="Every PNG carries its settings (A1111 `parameters` and JSON `flux_1` text chunks). "
        "Models come from the Hugging Face cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN) unless --path is given.",
    )
    add_model_arguments(p)
    p.add_argument("--seed", type=int, nargs="+", metavar="S",
                   help="one or more seeds, one image each (default: a random seed, printed and stored)")
    add_lora_arguments(p, "one strength per LoRA path (default 1.0 each)")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT,
                   help=f"output .png; may use {{seed}}, {{model}}, {{steps}} (default {DEFAULT_OUTPUT}). "
                   f"A folder (a trailing /, or an existing folder) gets {DEFAULT_OUTPUT} inside it. "
                   "Existing files are never overwritten: _1, _2, ... is added")
    p.add_argument("--metadata", action="store_true",
                   help="also write the metadata as a .json file beside each image")
    add_parallel_arguments(p)
    return p


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", choices=("tensor", "data"),
                   help="under mlx.launch: 'tensor' splits the transformer over the processes (one image at a time, "
                   "each holding about 1/N of it; rank 0 writes the images), 'data' deals the seeds over them "
                   "(each process holds the whole model and writes its own images)")
    p.add_argument("--parallel-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"with --parallel: stop when the other processes do not answer for S seconds (while "
                   f"connecting, or within one denoising step; default {DEFAULT_TIMEOUT:g})")


# -- checks before loading -----------------------------------------------------------------------------


def output_template(args: argparse.Namespace) -> str:
    """The --output template, checked; with several seeds and no {seed}, `_seed_{seed}` goes before .png."""
    template = args.output
    # A trailing slash, or an existing folder, names a folder: the default name goes inside it.
    if template.endswith(("/", os.sep)) or Path(template).is_dir():
        template = os.path.join(template, DEFAULT_OUTPUT)
    try:
        template.format(**{name: 0 for name in OUTPUT_FIELDS})
    except (KeyError, IndexError, ValueError) as e:
        fields = ", ".join(f"{{{name}}}" for name in OUTPUT_FIELDS)
        raise CLIError(f"--output {template!r} is not a valid name template ({e!r}); "
                       f"it may use {fields}") from None
    path = Path(template)
    if path.suffix == "":
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() != ".png":
        raise CLIError(f"--output {template!r} must be a .png file")
    if len(args.seed) > 1 and "{seed}" not in template:
        path = path.with_name(f"{path.stem}_seed_{{seed}}{path.suffix}")
    return str(path)


def check_output_folder(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CLIError(f"cannot write {path}: folder {parent} is not writable")
            return


def resolve_gguf_args(args: argparse.Namespace) -> dict[str, Path]:
    """{component: GGUF file} from --path / --transformer-gguf / --t5-gguf, each checked (a regular file
    of the right architecture). A --path that is a .gguf file becomes --transformer-gguf (args.path: None,
    the other components from the Hub)."""
    from ..loading import gguf

    path, tg, t5 = getattr(args, "path", None), getattr(args, "transformer_gguf", None), getattr(args, "t5_gguf", None)
    if path is not None and gguf.is_gguf(path) and not Path(path).is_dir():
        if tg is not None:
            raise CLIError(f"--path {path} is a transformer GGUF and --transformer-gguf {tg} is given: give one")
        args.path, args.transformer_gguf = None, path
    return gguf.resolve_files(args.path, args.transformer_gguf, t5)


def check_model_folder(root: Path, gguf_files: dict | None = None) -> None:
    """Fail now, not after minutes of loading, on a missing/unreadable folder, component or weight file."""
    from ..components import COMPONENTS, require_tokenizers
    from ..loading import folder, saved

    if not root.exists():
        raise CLIError(f"model path {root} does not exist")
    if not root.is_dir():
        raise CLIError(f"model path {root} is not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise CLIError(f"model path {root} is not readable")
    if saved.is_saved_folder(root):
        saved.check_folder(root)  # manifest, every shard's header and metadata, tokenizers
        return
    for component in COMPONENTS:
        if component not in (gguf_files or {}):
            folder.find_source(root, component)  # lazy: reads safetensors headers only
    require_tokenizers(root)


def check_lora_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.lora_scales is not None and not args.lora_paths:
        parser.error("--lora-scales given without --lora-paths")
    try:  # argparse's float() accepts nan and inf
        lora_strengths(args.lora_paths, args.lora_scales)
    except ValueError as e:
        message = str(e).replace("LoRA scale(s)", "--lora-scales").replace("LoRA path(s)", "--lora-paths")
        parser.error(message.replace("LoRA scale #", "--lora-scales #"))
    for lora in args.lora_paths:
        if not Path(lora).exists():
            parser.error(f"LoRA file {lora} does not exist")
        if not Path(lora).is_file():
            parser.error(f"LoRA path {lora} is not a file")


def check_lora_files(paths: list[str], scales: list[float] | None, model: str, root: Path | None,
                     precision: str | None = None, gguf_files: dict | None = None) -> int | None:
    """Read each LoRA file (header first) and resolve every key against the model's modules, as loading
    would, but against lazy skeletons built from the model folder's headers (`root`), or from FLUX.1's
    own shapes when the model comes from the Hub: a bad LoRA fails now, not after minutes of loading.
    Returns img_in's width with the LoRAs applied (None without LoRAs)."""
    from ..components import default_precision, precision_dtype
    from ..loading import component_shapes
    from ..pipeline.flux1 import default_shapes, resolve_loras, skeleton
    from ..safetensors_check import HeaderError, check_header

    if not paths:
        return None
    for path in paths:
        try:
            header = check_header(path)
        except HeaderError as e:
            why = str(e).removeprefix(f"{path}: ")
            raise CLIError(f"LoRA file {path} is not a readable .safetensors file ({why})") from None
        if not [k for k in header if k != "__metadata__"]:
            raise CLIError(f"LoRA file {path} holds no tensors")
    v = VARIANTS[model]
    shapes = {c: component_shapes(root, c, gguf_files) if root is not None or c in (gguf_files or {})
              else default_shapes(c, v.guidance_distilled, v.in_channels) for c in ("transformer", "clip")}
    dtype = precision_dtype(precision or default_precision())
    transformer = skeleton("transformer", shapes["transformer"], dtype)
    resolve_loras(paths, scales, shapes["transformer"], shapes["clip"], dtype, transformer=transformer)
    return transformer.input_channels


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        check_prompt(args.prompt)
    except ValueError as e:
        parser.error(f"--prompt: {e}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.steps is not None and args.steps > MAX_STEPS:
        parser.error(f"--steps must be at most {MAX_STEPS}, got {args.steps}")
    for name in ("height", "width"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 16:
            parser.error(f"--{name} must be at least 16 pixels, got {getattr(args, name)}")
        if getattr(args, name) > MAX_SIDE:
            parser.error(f"--{name} must be at most {MAX_SIDE} pixels, got {getattr(args, name)}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        parser.error(f"--guidance {args.guidance} is not a finite number")
    if args.image_strength is not None:
        if not math.isfinite(args.image_strength) or not 0 <= args.image_strength < 1:
            parser.error(f"--image-strength must be in [0, 1) (the fraction of the steps skipped), "
                         f"got {args.image_strength}")
        if args.image_path is None:
            parser.error("--image-strength is given without --image-path")
    for seed in args.seed or []:
        if not 0 <= seed <= MAX_SEED:
            parser.error(f"--seed {seed} is out of range: seeds are 0 to 2**64-1")
    check_lora_args(parser, args)
    timeout = getattr(args, "parallel_timeout", None)  # compare.py shares these checks, not the flag
    if timeout is not None and (not math.isfinite(timeout) or timeout <= 0):
        parser.error(f"--parallel-timeout must be a positive number of seconds, got {timeout}")


def make_config(args: argparse.Namespace) -> Config:
    """Config from the arguments; its size-rounding warnings are shown here, before loading."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with flag_names():
            config = Config(num_inference_steps=args.steps, height=args.height, width=args.width,
                            guidance=args.guidance, image_path=args.image_path,
                            image_strength=args.image_strength, mask_path=args.mask_path, outpaint=args.outpaint,
                            control_image_path=args.control_image_path, auto_resize=args.auto_resize)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.guidance is not None and not VARIANTS[args.model].guidance_distilled:
        print(f"warning: {args.model} has no guidance embedder: --guidance is ignored", file=sys.stderr)
    return config


def check_inputs(config: Config, model: str, in_channels: int, loras: bool, precision: str | None) -> None:
    """Before loading: the input images against what the model takes (each file read, a mask of another
    size warned about), and the resolved size against the machine's memory (Kontext's reference tokens
    included). `in_channels`: img_in's width, after the LoRAs (a control LoRA widens it)."""
    from ..components import default_precision, precision_dtype
    from ..pipeline import conditioning
    from ..pipeline.flux1 import check_size, conditioning_of, plan_inputs

    v = VARIANTS[model]
    with flag_names():
        kind = conditioning_of(v, in_channels)
        if kind == "none" and loras and config.control_image_path is not None:
            # A LoRA may widen img_in only when applied: the control image is read now, the rest is
            # checked once the transformer is loaded.
            conditioning.read_image(config.control_image_path, "control image")
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = plan_inputs(config, v, kind)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        pixels = max((i.image.width * i.image.height for i in (plan.image, plan.mask, plan.control) if i), default=0)
        check_size(plan.height, plan.width, precision_dtype(precision or default_precision()),
                   reference_tokens=plan.reference_tokens, input_pixels=pixels)


def model_in_channels(model: str, root: Path | None, gguf_files: dict | None = None) -> int:
    """img_in's width of the checkpoint (its headers), or of the variant's own when it comes from the Hub."""
    if root is None and "transformer" not in (gguf_files or {}):
        return VARIANTS[model].in_channels
    from ..loading import component_shapes
    from ..models.transformer import FluxParams

    return FluxParams.from_shapes(component_shapes(root, "transformer", gguf_files)).in_channels


def print_gguf(gguf_files: dict) -> None:
    """-v: each GGUF file's tensor types (counts per type, as ComfyUI-GGUF logs them)."""
    from ..loading.gguf import gguf_types

    for component, path in gguf_files.items():
        mix = ", ".join(f"{kind} ({n})" for kind, n in gguf_types(path, component).items())
        print(f"{component}: GGUF {path.name}: {mix}")


def print_backend() -> None:
    from ..backend import blas_info, malloc_info

    print(f"BLAS: {blas_info()}")
    print(f"malloc: {malloc_info()}")


# -- generation ------------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def stopped(rank: int, size: int, *_) -> None:
    """SIGTERM under a launcher: mlx.launch stops the other ranks this way when one fails. One line, and
    out at once (Python's own unwinding would print noise from threads blocked in a collective)."""
    print(f"error: rank {rank} of {size}: stopped by the launcher (another rank failed); no image written",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STOPPED)


def join_group(args: argparse.Namespace):
    """(group, watchdog) under a launcher with --parallel; (None, None) in a plain run, where nothing
    distributed is touched. A launched run without --parallel, or --parallel without a launcher, is
    refused (N copies of one run would each write the same images)."""
    from ..parallel import Watchdog, launched, world

    if not launched():
        if args.parallel:
            raise CLIError(f"--parallel {args.parallel} needs several processes: start it with mlx.launch, e.g. "
                           f"mlx.launch -n 2 --backend ring -- flux1-generate --parallel {args.parallel} ...")
        return None, None
    rank = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    watchdog = Watchdog(rank, 0, args.parallel_timeout)  # armed: joining blocks while a rank is missing
    group = world()
    watchdog.pause()
    if group is None:  # a launcher with one process: a plain run
        watchdog.stop()
        return None, None
    watchdog.rank, watchdog.size = group.rank(), group.size()
    signal.signal(signal.SIGTERM, functools.partial(stopped, group.rank(), group.size()))
    if not args.parallel:
        watchdog.stop()
        raise CLIError(f"this is one of {group.size()} processes started by a launcher: pass --parallel tensor "
                       "(split the model) or --parallel data (split the seeds)")
    return group, watchdog


def generate(args: argparse.Namespace, config: Config, template: str, group=None, watchdog=None) -> list[Path]:
    import mlx.core as mx

    from ..pipeline.flux1 import Flux1

    main_rank = group is None or group.rank() == 0  # prints and, tensor-parallel, writes the images
    seeds = args.seed
    if group is not None and args.parallel == "data":
        from ..parallel.data import my_seeds

        seeds = my_seeds(args.seed, group.rank(), group.size())
        print(f"rank {group.rank()} of {group.size()}: seeds {' '.join(map(str, seeds)) or '(none)'}")
        main_rank = True  # each rank writes its own images
        group = None  # the whole model in each process
        if not seeds:
            return []
    if args.path is None and main_rank:
        print(f"Loading {VARIANTS[args.model].repo_id} (Hugging Face cache)")
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    flux = Flux1.from_alias(args.model, path=args.path, quantize=args.quantize,
                            lora_paths=args.lora_paths or None, lora_scales=args.lora_scales,
                            precision=args.precision, low_memory=True,
                            transformer_gguf=args.transformer_gguf, t5_gguf=args.t5_gguf, group=group,
                            progress=main_rank)
    if group is not None and watchdog is not None:
        def step(done: int, steps: int) -> None:
            if done < steps:
                watchdog.kick(f"waiting for denoising step {done + 1} of {steps}")
            else:
                watchdog.pause()

        flux.step_hook = step
    if args.verbose and main_rank:
        print(f"load: {time.perf_counter() - t0:.2f} s, peak memory {format_bytes(mx.get_peak_memory())}")
        if flux.gguf_files:
            print_gguf(flux.gguf_files)

    steps = config.num_inference_steps or flux.variant.default_steps
    written = []
    for seed in seeds:
        if main_rank:
            print(f"Generating with seed {seed}")
        mx.reset_peak_memory()
        with flag_names():
            image = flux.generate_image(seed=seed, prompt=args.prompt, config=config, progress=main_rank)
        if not main_rank:
            continue
        if args.verbose:
            stages = ", ".join(f"{name.replace('_', ' ')}: {t:.2f} s" for name, t in image.timings.items())
            print(f"{stages}, peak memory {format_bytes(mx.get_peak_memory())}")
            mlx = ((image.quantization or {}).get("gguf", {}).get("transformer", {}).get("mlx")
                   or (image.quantization or {}).get("layers"))
            if mlx:
                print("transformer layers: " + ", ".join(f"{k} ({n})" for k, n in mlx.items()))
        target = Path(template.format(seed=seed, model=args.model, steps=steps))
        path = image.save(target, overwrite=False, sidecar=args.metadata)
        print(f"Saved {path}" + (f" and {path.with_suffix('.json')}" if args.metadata else ""))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.seed is None:
        args.seed = [random.randrange(2**32)]
    try:
        template = output_template(args)
    except CLIError as e:
        parser.error(str(e))
    with user_errors():
        if args.verbose and os.environ.get("MLX_RANK", "0") == "0":  # launched: rank 0 speaks for all
            print_backend()
        check_output_folder(Path(template.format(seed=args.seed[0], model=args.model, steps=args.steps or 0)))
        config = make_config(args)
        gguf_files = resolve_gguf_args(args)
        if args.parallel == "tensor" and "transformer" in gguf_files:
            raise CLIError("--parallel tensor does not load a GGUF transformer: use its safetensors folder, or "
                           "--parallel data")
        if args.path is not None:
            check_model_folder(args.path, gguf_files)
        widened = check_lora_files(args.lora_paths, args.lora_scales, args.model, args.path, args.precision,
                                   gguf_files)
        check_inputs(config, args.model, widened or model_in_channels(args.model, args.path, gguf_files),
                     bool(args.lora_paths), args.precision)
        group, watchdog = join_group(args)
        try:
            generate(args, config, template, group, watchdog)
        except RuntimeError as e:
            if group is None or "[ring]" not in str(e) and "connection" not in str(e):
                raise
            raise CLIError(f"rank {group.rank()} of {group.size()}: lost another rank ({e}); stopping, "
                           "no image written") from None
        finally:
            if watchdog is not None:
                watchdog.stop()


if __name__ == "__main__":
    main()
