"""`Flux1`: load the four models, encode the prompt, denoise, decode."""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import quantization as q
from ..backend import quiet_transformers
from ..components import COMPONENTS, default_precision, precision_dtype, require_tokenizers
from ..loading import component_shapes, load_component
from ..lora import lora_strengths
from ..models.transformer import FluxParams
from . import conditioning, sampler
from .variants import Variant, variant

# Hard caps, whatever the machine: they keep every size computation far from int64 overflow (tokens
# <= 2**24, pixels <= 2**32) and a typo (`--steps 1000000000`) from running for ever. Sizes below the
# caps are then checked against the machine's memory (`check_size`).
MAX_STEPS = 10_000
MAX_SIDE = 65_536
TEXT_TOKENS = 512  # T5 tokens of dev (schnell uses 256): the estimate takes the larger
FLUX1 = FluxParams()  # the real FLUX.1 widths, for estimates made before any weight is read


class NonFiniteError(ValueError):
    """The latents stopped being finite numbers during denoising (an overflow, a broken LoRA...)."""


def _integer(value, name: str) -> int:
    """An int, or a float with an integral value (1024.0, as JSON or arithmetic may give); never a bool."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def finite_number(value, name: str) -> float:
    """A finite float (argparse's and Python's float() both accept 'nan' and 'inf'); never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_prompt(prompt) -> str:
    """A non-empty str that is valid Unicode: argv bytes that are not UTF-8 arrive as lone surrogates
    ('\\udcff'), which the tokenizers and the PNG/JSON metadata cannot encode."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the prompt is not valid UTF-8 (undecodable byte at character {e.start}): "
                         "pass UTF-8 text") from None
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return prompt


# -- memory -------------------------------------------------------------------------------------------


def available_memory() -> tuple[int | None, str]:
    """(bytes, what) the default device can hold: the GPU's memory size, else the physical RAM."""
    if mx.default_device() == mx.gpu:
        try:
            info = mx.device_info()
        except Exception:  # older mlx: Metal only
            info = mx.metal.device_info()
        size = info.get("memory_size") or info.get("total_memory")
        if size:
            return int(size), "GPU memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return None, "memory"


def estimate_memory(height: int, width: int, dtype: mx.Dtype, params: FluxParams = FLUX1,
                    on_gpu: bool | None = None, reference_tokens: int = 0,
                    input_pixels: int = 0) -> dict[str, int]:
    """Bytes of activations the largest stages need at this size (weights not counted: a lower bound).

    - transformer: per token of the joint sequence ((H/16)(W/16) image + 512 text tokens), a single
      block holds about 12 hidden-wide and 3 mlp-wide vectors at once (input, linear1's q|k|v|mlp,
      RoPE'd q and k in float32, the attention output, the MLP activation, the concat, linear2's
      output). On the CPU, MLX's attention materialises the float32 scores, heads x tokens^2; the GPU
      kernels are fused and do not.
    - VAE decode: its convs run in strips, but the full-resolution tensors of the last up blocks are
      whole: about 640 channels' worth at H x W (the 256-channel upsampled input, the 128-channel
      working tensors and residual), plus the mid-block attention scores over (H/8)(W/8) pixels on CPU.
      Encoding an input image of `input_pixels` holds less per pixel (128 channels at full size): it is
      counted as a decode of that size, an upper bound.
    - Kontext appends `reference_tokens` to the joint sequence (about doubling it).
    """
    on_gpu = mx.default_device() == mx.gpu if on_gpu is None else on_gpu
    b = dtype.size
    tokens = (height // 16) * (width // 16) + reference_tokens + TEXT_TOKENS
    transformer = tokens * (12 * params.hidden_size + 3 * params.mlp_hidden) * b
    if not on_gpu:
        transformer += params.num_heads * tokens * tokens * 4
    pixels = max(height * width, input_pixels)
    vae = pixels * 640 * b + (0 if on_gpu else (pixels // 64) ** 2 * 4)
    return {"transformer": transformer, "vae decode": vae}


class StepBufferCache:
    """MLX's CPU buffer cache keeps 32 MiB by default: every larger buffer a step frees goes back to malloc.
    Where `backend.tune_malloc` could not keep that memory in the heap (another C library, FLUX1_MALLOC=off),
    it goes back to the OS and the next step page-faults it in again (100-180k minor faults, 0.2-0.3 s, per
    step of the `slice` bench). There, while denoising on the CPU, the cache is bounded only by MLX's memory
    limit during the first step; after it (`step_done`) the limit becomes what that step left cached: the
    buffers every later step allocates again. Its price is memory (MLX reuses a cached buffer only for a
    request of nearly its size: `slice` keeps 700 MiB beside a 429 MiB working set), which is why the heap
    is the first choice: the same speed, 0.16 GB less peak RSS at `slice`. MLX empties its cache before an
    allocation would pass its memory limit. Restored, and emptied, afterwards; other backends keep their
    own (large) default. `enabled` overrides the choice (tests)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self.previous = None  # the limit before, while a CPU cache limit is ours
        self.settled = False

    def __enter__(self):
        from ..backend import tune_malloc

        enabled = self.enabled if self.enabled is not None else not tune_malloc()
        if enabled and mx.default_device() == mx.cpu:
            memory_limit = mx.set_memory_limit(0)  # read it: MLX has no getter
            mx.set_memory_limit(memory_limit)
            self.previous = mx.set_cache_limit(memory_limit)
            self.settled = False
        return self

    def step_done(self) -> None:
        """After each step: the first one fixes the limit at what it left in the cache."""
        if self.previous is not None and not self.settled:
            mx.set_cache_limit(max(self.previous, mx.get_cache_memory()))
            self.settled = True

    def __exit__(self, *exc):
        if self.previous is not None:
            mx.set_cache_limit(self.previous)
            mx.clear_cache()
            self.previous = None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_size(height: int, width: int, dtype: mx.Dtype, params: FluxParams = FLUX1,
               reference_tokens: int = 0, input_pixels: int = 0) -> None:
    """Refuse a size whose activations alone exceed the device's memory (estimated, before loading)."""
    need = estimate_memory(height, width, dtype, params, reference_tokens=reference_tokens,
                           input_pixels=input_pixels)
    stage, peak = max(need.items(), key=lambda kv: kv[1])
    have, what = available_memory()
    if have is not None and peak > have:
        raise ValueError(f"{width}x{height} needs about {_gib(peak)} for the {stage} alone "
                         f"(estimated, weights not counted), more than this machine's {_gib(have)} of "
                         f"{what}: choose a smaller size")


@dataclass
class Config:
    """Sizes and steps are ints (an integral float such as 1024.0 is accepted; a bool, a string or
    1024.5 is not); guidance and image_strength are finite numbers. Every check raises a ValueError
    naming the field. Input files are read by `generate_image` (and checked by `plan_inputs`)."""

    num_inference_steps: int | None = None  # None: the model's default (schnell 4, dev 25, ...)
    # None: 1024 for text to image; the input image's size rounded down to multiples of 16 with an
    # image (Kontext: the reference's resized size; Fill: the outpainted size). Given: that size.
    height: int | None = None
    width: int | None = None
    guidance: float | None = None  # None: the model's default; schnell has no guidance and ignores it
    image_path: str | Path | None = None  # img2img start (schnell, dev), Kontext reference, Fill image
    image_strength: float | None = None  # fraction of the schedule skipped, in [0, 1); needs image_path
    mask_path: str | Path | None = None  # Fill: white is repainted
    outpaint: tuple[int, int, int, int] | None = None  # Fill: pixels added (top, right, bottom, left)
    control_image_path: str | Path | None = None  # Canny/Depth: an edge or depth map
    auto_resize: bool = True  # Kontext: resize the reference to the nearest preferred resolution

    def __post_init__(self):
        if self.num_inference_steps is not None:
            steps = _integer(self.num_inference_steps, "steps")
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            if steps > MAX_STEPS:
                raise ValueError(f"steps must be at most {MAX_STEPS}, got {steps}")
            self.num_inference_steps = steps
        if self.guidance is not None:
            self.guidance = finite_number(self.guidance, "guidance")
        for name in ("height", "width"):
            if getattr(self, name) is None:
                continue
            value = _integer(getattr(self, name), name)
            if value < 16:
                raise ValueError(f"{name} must be at least 16 pixels, got {value}")
            if value > MAX_SIDE:
                raise ValueError(f"{name} must be at most {MAX_SIDE} pixels, got {value}")
            if value % 16:
                rounded = value // 16 * 16
                warnings.warn(f"{name} {value} is not a multiple of 16: using {rounded}", stacklevel=3)
                value = rounded
            setattr(self, name, value)
        for name in ("image_path", "mask_path", "control_image_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path, got {value!r}")
            if value is not None and not str(value):
                raise ValueError(f"{name} is empty")
        if self.image_strength is not None:
            strength = finite_number(self.image_strength, "image_strength")
            if not 0 <= strength < 1:
                raise ValueError(f"image_strength must be in [0, 1) (the fraction of the steps skipped), "
                                 f"got {strength}")
            if self.image_path is None:
                raise ValueError("image_strength is given without an image: give image_path too")
            self.image_strength = strength
        if self.outpaint is not None:
            try:
                sides = tuple(_integer(v, "outpaint") for v in self.outpaint)
            except TypeError:
                raise ValueError(f"outpaint must be 4 pixel counts (top, right, bottom, left), "
                                 f"got {self.outpaint!r}") from None
            if len(sides) != 4 or min(sides) < 0 or max(sides) > MAX_SIDE:
                raise ValueError(f"outpaint must be 4 pixel counts from 0 to {MAX_SIDE} (top, right, bottom, "
                                 f"left), got {self.outpaint!r}")
            if not any(sides):
                raise ValueError("outpaint adds no pixel: give at least one non-zero side")
            self.outpaint = sides
        if not isinstance(self.auto_resize, bool):
            raise ValueError(f"auto_resize must be True or False, got {self.auto_resize!r}")


# -- image inputs: what each conditioning takes, and the sizes, before anything loads -------------------

MODES = {"reference": "kontext", "fill": "fill", "control": "control"}  # conditioning -> metadata mode
# Which Config fields each conditioning takes ("none" also takes image_path: img2img).
TAKES = {
    "none": {"image_path", "image_strength"},
    "reference": {"image_path", "auto_resize"},
    "fill": {"image_path", "image_strength", "mask_path", "outpaint"},
    "control": {"control_image_path"},
}
WHAT = {"image_path": "an input image", "image_strength": "an image strength", "mask_path": "a mask",
        "outpaint": "outpainting", "control_image_path": "a control image", "auto_resize": "auto_resize=False"}


def conditioning_of(v: Variant, in_channels: int, source: str = "the transformer") -> str:
    """The conditioning a transformer of this img_in width runs under `v`: the variant's own, or control
    when a control LoRA widened a plain model's img_in to 128 inputs. Any other width is refused."""
    from .variants import INPUT_CHANNELS

    if v.conditioning == "none" and in_channels == INPUT_CHANNELS["control"]:
        return "control"
    if in_channels != v.in_channels:
        kinds = {64: "a text-to-image or Kontext", 128: "a Canny/Depth", 384: "a Fill"}
        kind = kinds.get(in_channels, "an unknown")
        raise ValueError(f"{source} takes {in_channels} input channels ({kind} model), but {v.alias!r} needs "
                         f"{v.in_channels}: choose the matching --model")
    return v.conditioning


@dataclass
class Inputs:
    """A request resolved against a variant: the mode, the output size and the input files, read."""

    conditioning: str
    width: int
    height: int
    image: object | None = None  # conditioning.InputImage
    mask: object | None = None
    control: object | None = None
    image_strength: float | None = None  # img2img / Fill start; None: from noise
    reference_size: tuple[int, int] | None = None  # Kontext (width, height)
    outpaint: tuple[int, int, int, int] | None = None  # Fill (top, right, bottom, left)

    @property
    def mode(self) -> str:
        if self.conditioning == "none":
            return "img2img" if self.image is not None else "txt2img"
        return MODES[self.conditioning]

    @property
    def reference_tokens(self) -> int:
        if self.reference_size is None:
            return 0
        rows, cols = sampler.latent_grid(self.reference_size[1], self.reference_size[0])
        return rows * cols

    def records(self) -> dict[str, dict]:
        named = {"image": self.image, "mask": self.mask, "control_image": self.control}
        return {k: v.record() for k, v in named.items() if v is not None}


def check_request(config: Config, v: Variant, conditioning: str) -> None:
    """Refuse inputs the model cannot take, and a missing one it needs (no file is read)."""
    given = {name for name in ("image_path", "image_strength", "mask_path", "outpaint", "control_image_path")
             if getattr(config, name) is not None}
    if not config.auto_resize:
        given.add("auto_resize")
    takes = TAKES[conditioning]
    for name in sorted(given - takes):
        if conditioning == "control" and name == "image_path":
            raise ValueError(f"{v.alias!r} follows a control image: give it as control_image_path, "
                             "not image_path")
        users = {"mask_path": "Fill (dev-fill)", "outpaint": "Fill (dev-fill)",
                 "control_image_path": "Canny/Depth (dev-canny, dev-depth, or dev with a control LoRA)",
                 "auto_resize": "Kontext (dev-kontext)", "image_path": "schnell, dev, Kontext and Fill",
                 "image_strength": "img2img (schnell, dev) and Fill"}[name]
        shown = "auto_resize=False" if name == "auto_resize" else name
        raise ValueError(f"{v.alias!r} takes no {shown}: {WHAT[name]} is for {users}")
    if conditioning in ("reference", "fill") and config.image_path is None:
        raise ValueError(f"{v.alias!r} needs an input image: give image_path")
    if conditioning == "fill" and config.mask_path is None and config.outpaint is None:
        raise ValueError(f"{v.alias!r} needs a mask (mask_path, white = repaint) or outpaint")
    if conditioning == "control" and config.control_image_path is None:
        what = v.alias if v.conditioning == "control" else f"{v.alias} with a control LoRA"
        raise ValueError(f"{what!r} needs a control image (an edge or depth map): give control_image_path")


def plan_inputs(config: Config, v: Variant, conditioning: str) -> Inputs:
    """Check the request against the conditioning, read the input files (each failure names the file)
    and resolve the output size. Mask-size mismatches warn (the mask is resized)."""
    from . import conditioning as cond

    check_request(config, v, conditioning)
    plan = Inputs(conditioning, config.width or 1024, config.height or 1024, outpaint=config.outpaint)
    source = None
    if config.image_path is not None:
        plan.image = source = cond.read_image(config.image_path, "image")
    if config.mask_path is not None:
        plan.mask = cond.read_image(config.mask_path, "mask")
        if plan.mask.image.size != plan.image.image.size:
            mw, mh = plan.mask.image.size
            iw, ih = plan.image.image.size
            warnings.warn(f"mask {plan.mask.path} is {mw}x{mh} but the image is {iw}x{ih}: the mask is resized "
                          "to the image", stacklevel=3)
    if config.control_image_path is not None:
        plan.control = source = cond.read_image(config.control_image_path, "control image")
    if source is None:
        return plan
    w, h = source.image.size
    if conditioning == "reference":
        plan.reference_size = cond.kontext_size(w, h, config.auto_resize)
        w, h = plan.reference_size
    elif conditioning == "fill":
        w, h = cond.outpaint_size(w, h, config.outpaint)
    w, h = cond.round_down(w, h)
    for name, value in (("width", w), ("height", h)):
        if value > MAX_SIDE:
            raise ValueError(f"the output {name} would be {value} pixels, more than {MAX_SIDE}")
    plan.width, plan.height = config.width or w, config.height or h
    if conditioning in ("none", "fill") and plan.image is not None:
        default = v.default_image_strength if v.default_image_strength is not None else 0.0
        plan.image_strength = config.image_strength if config.image_strength is not None else default
    return plan


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int | None  # None: the image started from given latents, not from the seed's noise
    prompt: str
    config: Config
    model: str
    precision: str
    quantization: dict | None
    loras: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Whether config.guidance was used: the transformer has a guidance embedder (None: dev alias).
    uses_guidance: bool | None = None
    latents_given: bool = False
    mode: str = "txt2img"  # txt2img, img2img, kontext, fill or control
    inputs: dict[str, dict] = field(default_factory=dict)  # image / mask / control_image: file, sha256

    def metadata(self) -> dict:
        from .metadata import image_metadata

        return image_metadata(self)

    def save(self, path: str | Path, overwrite: bool = False, sidecar: bool = False) -> Path:
        from .metadata import save_png

        return save_png(self, Path(path), overwrite=overwrite, sidecar=sidecar)


# -- reading the architecture without loading ---------------------------------------------------------


def skeleton(component: str, shapes: dict, dtype: mx.Dtype):
    """The module tree of a component, never evaluated: MLX arrays are lazy, so its random
    initial weights take no memory. LoRAs are resolved (and side paths built) against it."""
    model = COMPONENTS[component].build(shapes)
    model.set_dtype(dtype)
    return model


def default_shapes(component: str, guidance: bool, in_channels: int = FLUX1.in_channels) -> dict:
    """Shapes of the real FLUX.1 component (the params' defaults), for checks with no local folder."""
    from mlx.utils import tree_flatten

    facts = COMPONENTS[component]
    params = (FluxParams(guidance_embed=guidance, in_channels=in_channels) if component == "transformer"
              else facts.params())
    return {k: tuple(v.shape) for k, v in tree_flatten(facts.model(params).parameters())}


def resolve_loras(paths: list[str], scales: list[float] | None, transformer_shapes: dict, clip_shapes: dict,
                  dtype: mx.Dtype = mx.float32, log=None, transformer=None):
    """Read and resolve LoRA files against skeletons of the models (nothing loaded): every key, shape
    and strength is checked, as applying them would. Returns the LoRAStack (side path, not merged).
    `transformer`: a skeleton to resolve against (kept by the caller, e.g. to read img_in's width after
    a control LoRA), instead of one built from `transformer_shapes`."""
    from ..lora import LoRAStack

    transformer = transformer if transformer is not None else skeleton("transformer", transformer_shapes, dtype)
    return LoRAStack.load(paths, scales, transformer, skeleton("clip", clip_shapes, dtype), merge=False, log=log)


class Flux1:
    """FLUX.1 schnell or dev: text encoders, transformer and VAE, loaded from one folder.

    Components are built from the weights' own shapes. With `low_memory` (the default, as in the
    CLI), the text encoders are released after each prompt is encoded (and reloaded for a new
    prompt) and the transformer is loaded only after the first prompt is encoded, whatever else is
    asked: peak memory is the largest stage (text encoding, or denoising) rather than the sum of all
    models. What needs the transformer before that is read off its safetensors headers instead:
    whether it has a guidance embedder, and the modules LoRAs are resolved against (a lazy skeleton).
    LoRAs are read and checked before any weight loads; their CLIP part is applied when CLIP loads
    (before the prompt is encoded), their transformer part when the transformer loads.
    """

    def __init__(self, root: Path, variant: Variant, precision: str | None = None,
                 quantize: int | str | None = None, low_memory: bool = True,
                 lora_paths: list[str] | None = None, lora_scales: list[float] | None = None,
                 lora_merge: bool = True, progress: bool = True,
                 transformer_gguf: str | Path | None = None, t5_gguf: str | Path | None = None,
                 group: mx.distributed.Group | None = None):
        from ..loading.gguf import resolve_files

        precision = precision or default_precision()
        # Tensor parallel (flux_1.parallel): this rank holds its share of the transformer; None: one process.
        self.group = group
        self.reducer = None  # the sharded blocks' all_sum, which counts what it sums
        self.step_hook = None  # called with (step, steps) before the first denoising step and after each
        self.dtype = precision_dtype(precision)
        self.root, self.variant, self.precision = Path(root), variant, precision
        self.low_memory = low_memory
        self.lora_merge = lora_merge
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.quant_spec = q.parse(quantize)
        # {component: GGUF file}: given, or found in the folder where the component's own weights are absent
        self.gguf_files = resolve_files(self.root, transformer_gguf, t5_gguf)
        lora_scales = lora_strengths(lora_paths or [], lora_scales) if lora_paths else None
        self._prompt_cache: dict[str, tuple[mx.array, mx.array]] = {}
        # Encoded input images of the last request, so several seeds encode each input once.
        self._encodings: dict[tuple, mx.array] = {}
        self._encodings_used: set[tuple] = set()
        self.loras = None
        self._transformer = None
        self.t5 = self.clip = None
        # Read off the headers now: guidance and LoRA checks must not load the transformer early.
        self._header_shapes: dict[str, dict] = {}
        self.transformer_params = FluxParams.from_shapes(self._shapes("transformer"))
        if self.transformer_params.guidance_embed != variant.guidance_distilled:
            holds = ("a guidance-distilled (dev-like)" if self.transformer_params.guidance_embed
                     else "a schnell-like (no guidance embedder)")
            note = "" if self.transformer_params.guidance_embed else ": guidance is ignored"
            warnings.warn(f"{self.root} holds {holds} transformer; loaded as {variant.alias!r}{note}",
                          stacklevel=3)
        if self.transformer_params.out_channels != FLUX1.out_channels:
            raise ValueError(f"{self.root}: the transformer outputs {self.transformer_params.out_channels} "
                             f"channels, not {FLUX1.out_channels}: not a FLUX.1 transformer")
        conditioning_of(variant, self.transformer_params.in_channels, f"the transformer in {self.root}")
        self._lora_in_channels = None  # img_in's width after the LoRAs, as resolved on a skeleton
        self.baked_loras = self._baked_loras()
        t0 = time.perf_counter()
        if lora_paths:  # read and checked before any weight loads
            self.set_loras(lora_paths, lora_scales)
        self.vae = self._load("vae")
        self._load_text_encoders()
        if not low_memory:
            self._load_transformer()
        self.timings["load"] = time.perf_counter() - t0

    @property
    def transformer(self):
        """The FLUX transformer; with `low_memory` it is first loaded after the first prompt is encoded,
        so the text encoders and the transformer are never resident together."""
        if self._transformer is None:
            self._load_transformer()
        return self._transformer

    def _load_transformer(self):
        t0 = time.perf_counter()
        if self.low_memory and self.t5 is not None:  # encoders no longer needed once a prompt is cached
            self._free_text_encoders()
        if self.group is not None:
            self._transformer = self._load_shard()
        else:
            self._transformer = self._load("transformer")
        if self.loras is not None and self.group is not None:  # split with the layers they patch
            from ..parallel.tensor import shard_loras

            shard_loras(self.loras, self._transformer, self.transformer_params, self.dtype, self.group.rank(),
                        self.group.size(), self.lora_merge)
        elif self.loras is not None:  # resolved at construction; the transformer part is applied now
            self.loras.set_merge(self.lora_merge, self._transformer, self.clip)
        self.timings["load_transformer"] = time.perf_counter() - t0

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_alias(cls, alias: str, path: str | Path | None = None, quantize: int | str | None = None,
                   lora_paths: list[str] | None = None, lora_scales: list[float] | None = None,
                   precision: str | None = None, low_memory: bool = True, lora_merge: bool = True,
                   progress: bool = True, transformer_gguf: str | Path | None = None,
                   t5_gguf: str | Path | None = None, group: mx.distributed.Group | None = None) -> Flux1:
        """`path`: a model folder, or a transformer `.gguf` file (the other components then come from the
        Hub); `transformer_gguf` / `t5_gguf`: GGUF files used instead of the folder's transformer / T5.
        `group` (from `flux_1.parallel.world()`, under a launcher): the transformer is tensor-parallel."""
        from ..loading.gguf import is_gguf

        facts = variant(alias)
        if lora_paths:
            lora_strengths(lora_paths, lora_scales)  # before any download
        if path is not None and is_gguf(path) and not Path(path).is_dir():
            if transformer_gguf is not None:
                raise ValueError(f"two transformer GGUFs: path={path} and transformer_gguf={transformer_gguf}")
            transformer_gguf, path = path, None
            from ..loading.gguf import check_architecture, open_reader

            check_architecture(open_reader(transformer_gguf), transformer_gguf, "transformer")  # before downloading
        if path is None:
            from ..loading.hub import download

            root = download(facts.repo_id)
        else:
            root = Path(path)
            if not root.is_dir():
                raise FileNotFoundError(f"model path {root} does not exist or is not a folder")
        return cls(root, facts, precision=precision, quantize=quantize, low_memory=low_memory,
                   lora_paths=lora_paths, lora_scales=lora_scales, lora_merge=lora_merge, progress=progress,
                   transformer_gguf=transformer_gguf, t5_gguf=t5_gguf, group=group)

    def _shapes(self, component: str) -> dict:
        """A component's weight shapes, read off its headers once (for skeletons and checks)."""
        if component not in self._header_shapes:
            self._header_shapes[component] = component_shapes(self.root, component, self.gguf_files)
        return self._header_shapes[component]

    def _load_shard(self):
        from ..parallel.tensor import load_shard

        if self.progress:
            print(f"loading transformer (rank {self.group.rank()} of {self.group.size()}'s share)",
                  file=sys.stderr, flush=True)
        model, self.reducer = load_shard(self.root, self.dtype, self.quant_spec, self.group, self.gguf_files)
        return model

    def _load(self, component: str):
        if self.progress:
            where = f" from {self.gguf_files[component].name}" if component in self.gguf_files else ""
            print(f"loading {component}{where}", file=sys.stderr, flush=True)
        return load_component(self.root, component, self.dtype, self.quant_spec, self.gguf_files)

    def _baked_loras(self) -> list[dict]:
        """LoRAs merged into a saved folder's weights (its manifest lists them), for the metadata. A folder
        saved as another model (Kontext weights have dev's shapes) is a warning before anything loads."""
        from ..loading import saved

        if not saved.is_saved_folder(self.root):
            return []
        manifest = saved.read_manifest(self.root)
        if manifest.get("model") not in (None, self.variant.alias):
            warnings.warn(f"{self.root} was saved as {manifest.get('model')!r}; loaded as {self.variant.alias!r}",
                          stacklevel=4)
        entries = []
        for lora in manifest.get("loras") or []:
            name = Path(str(lora.get("name") or lora.get("path") or "lora")).stem
            entries.append({"name": name, "scale": float(lora.get("scale", 1.0)), "baked": True})
        return entries

    def _load_text_encoders(self):
        with quiet_transformers():  # no "PyTorch was not found" advice: we only use the tokenizers
            from transformers import CLIPTokenizer, T5TokenizerFast

        require_tokenizers(self.root)
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(str(self.root / "tokenizer"))
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(str(self.root / "tokenizer_2"))
        self.clip = self._load("clip")
        self.t5 = self._load("t5")
        if self.loras is not None:
            self.loras.apply_text_encoder(self.clip)

    def _free_text_encoders(self):
        self.t5 = self.clip = None
        mx.clear_cache()

    @property
    def input_channels(self) -> int:
        """img_in's width: the loaded transformer's, else as the LoRAs left the skeleton, else the headers'."""
        if self._transformer is not None:
            return self._transformer.input_channels
        return self._lora_in_channels or self.transformer_params.in_channels

    @property
    def conditioning(self) -> str:
        """How input images reach this model: none, reference, fill or control (see variants.py)."""
        return conditioning_of(self.variant, self.input_channels)

    @property
    def is_guidance_distilled(self) -> bool:
        """Whether the transformer has a guidance embedder (read off its weights; nothing is loaded)."""
        return self.transformer_params.guidance_embed

    @property
    def quantization(self) -> dict | None:
        from ..loading import saved

        if self.gguf_files:
            return self._gguf_quantization()
        if saved.is_saved_folder(self.root):  # the saved quantization wins over -q
            return self._saved_quantization()
        return self.quant_spec.as_dict() if self.quant_spec else self._saved_quantization()

    def _saved_quantization(self) -> dict | None:
        layers = q.describe(self.transformer)
        if not layers:
            return None
        if q.is_mixed(layers):  # a save of a GGUF model: per-layer settings
            return {"mode": "mixed", "bits": None, "group_size": None, "layers": q.plan_summary(layers)}
        first = next(iter(layers.values()))
        return {"bits": first["bits"], "group_size": first["group_size"], "mode": first["mode"]}

    def _gguf_quantization(self) -> dict:
        """The mix a GGUF model runs: per GGUF file its tensor types (counts per type, as ComfyUI-GGUF logs
        them) and the MLX settings its layers were loaded into (counts per setting), plus -q if given."""
        from ..loading.gguf import gguf_types

        out = {"mode": "gguf", "bits": None, "group_size": None,
               "requested": self.quant_spec.as_dict() if self.quant_spec else None, "gguf": {}}
        for component, path in self.gguf_files.items():
            entry = {"file": Path(path).name, "types": gguf_types(path, component)}
            if component == "transformer":
                entry["mlx"] = q.plan_summary(q.describe(self.transformer))
            out["gguf"][component] = entry
        return out

    # -- LoRA --------------------------------------------------------------------------------------

    def set_loras(self, paths: list[str], scales: list[float] | None = None):
        """Load LoRA files and apply them with the given strengths (replacing any applied before).

        Full-precision layers get the delta merged into W (computed in float32) when `lora_merge`
        (the default: no per-step cost); quantized layers always use an exact low-rank side path.
        With lora_merge=False every layer uses the side path, so strength changes and removal
        return bit-exactly to the base weights (compare.py's strength sweeps).

        Models not loaded now (the transformer before the first prompt, the text encoders after it,
        with `low_memory`) are stood in for by lazy skeletons built from the weight headers: every key
        is resolved and checked now, and the LoRAs are applied to each model when it is loaded.
        """
        scales = lora_strengths(paths, scales)
        self._check_not_sharded()
        transformer = self._transformer if self._transformer is not None else skeleton(
            "transformer", self._shapes("transformer"), self.dtype)
        clip = self.clip if self.clip is not None else skeleton("clip", self._shapes("clip"), self.dtype)
        if self.loras is not None:
            self.loras.remove(transformer, clip)  # a skeleton holds nothing to undo
        self.loras = None
        # The side path (merge=False) never evaluates a skeleton's weights; the merge mode wanted is
        # set on the real models below, or when they are loaded (set_merge / apply_text_encoder).
        from ..lora import LoRAStack

        stack = LoRAStack.load(paths, scales, transformer, clip, merge=False,
                               log=print if self.progress else None)
        self._lora_in_channels = transformer.input_channels  # a control LoRA widens img_in
        if self._transformer is not None:
            stack.set_merge(self.lora_merge, self._transformer, self.clip)
        else:
            stack.merge = self.lora_merge  # applies from the next refresh (loading a model)
            if self.clip is not None:
                stack.apply_text_encoder(self.clip)
        self.loras = stack
        self._prompt_cache.clear()

    def set_lora_scales(self, scales: list[float]):
        """Change LoRA strengths without reloading anything."""
        if self.loras is None:
            raise ValueError("no LoRA is applied")
        self._check_not_sharded()
        scales = lora_strengths(list(self.loras.entries), scales)
        transformer = self._transformer
        if transformer is None and not self.loras.merge:
            # Not loaded yet (low_memory): retune against a skeleton (the side path never evaluates
            # its weights); the strengths reach the transformer when it is loaded.
            transformer = skeleton("transformer", self._shapes("transformer"), self.dtype)
        elif transformer is None:
            transformer = self.transformer  # merging needs the real weights
        self.loras.set_scales(scales, transformer, self.clip)
        if self.loras.touches_text_encoder():
            self._prompt_cache.clear()

    def _check_not_sharded(self) -> None:
        if self.group is not None and self._transformer is not None:
            raise ValueError("LoRAs cannot change on a loaded tensor-parallel transformer: give them to a new "
                             "Flux1 (lora_paths, lora_scales)")

    def lora_info(self) -> list[dict]:
        live = self.loras.info() if self.loras is not None else []
        return [*self.baked_loras, *live]

    # -- generation --------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[mx.array, mx.array]:
        """(T5 hidden states (1, L, 4096), CLIP pooled (1, 768)), cached per prompt."""
        check_prompt(prompt)
        if prompt in self._prompt_cache:
            return self._prompt_cache[prompt]
        if self.t5 is None:
            if self.low_memory and self._transformer is not None:
                # A new prompt: the transformer goes (and is reloaded, LoRAs re-applied, to denoise),
                # so the encoders and the transformer are never resident together.
                self._transformer = None
                mx.clear_cache()
            self._load_text_encoders()
        clip_ids = self.clip_tokenizer(prompt, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="np").input_ids
        t5_ids = self.t5_tokenizer(prompt, padding="max_length", max_length=self.variant.max_sequence_length,
                                   truncation=True, return_tensors="np").input_ids
        with tqdm(total=2, desc="text encoding", unit="model", disable=not self.progress) as bar:
            _, pooled = self.clip(mx.array(clip_ids.astype(np.int32)))
            mx.eval(pooled)
            bar.update()
            txt = self.t5(mx.array(t5_ids.astype(np.int32)))
            mx.eval(txt)
            bar.update()
        self._prompt_cache = {prompt: (txt, pooled)}
        if self.low_memory:
            self._free_text_encoders()
        return txt, pooled

    def check_size(self, config: Config) -> None:
        """Refuse a size that cannot fit in memory (see `check_size`), before anything runs."""
        plan = plan_inputs(config, self.variant, self.conditioning)
        self._check_size(plan)

    def _check_size(self, plan: Inputs) -> None:
        pixels = max((i.image.width * i.image.height for i in (plan.image, plan.mask, plan.control) if i), default=0)
        check_size(plan.height, plan.width, self.dtype, self.transformer_params,
                   reference_tokens=plan.reference_tokens, input_pixels=pixels)

    def generate_image(self, seed: int | None, prompt: str, config: Config | None = None,
                       latents=None, progress: bool = True) -> GeneratedImage:
        """One image, in the stages of BFL's sampling.py: encode the prompt, prepare the initial latents
        (noise, or noise mixed with an encoded image), prepare the conditioning (reference tokens, or
        channels to concatenate), denoise, decode.

        With `latents` (packed, (1, H/16 * W/16, 64)) the seed is not used: the metadata records
        `seed: null` and `latents: "given"`. For img2img (and Fill with image_strength > 0) `latents` is
        the noise that is mixed with the encoded image."""
        config = config or Config()
        if not isinstance(config, Config):
            raise ValueError(f"config must be a Config, got {type(config).__name__}")
        check_prompt(prompt)
        if latents is None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an integer from 0 to 2**64-1, got {seed!r}")
        # A plain model with LoRAs may turn out to be a control model only once loaded (the LoRA widens
        # img_in): a control image given to it is then checked after loading, not refused now.
        deferred = (self._transformer is None and self.loras is not None and self.conditioning == "none"
                    and config.control_image_path is not None)
        plan = None if deferred else plan_inputs(config, self.variant, self.conditioning)
        if plan is not None:
            self._check_size(plan)
        steps = config.num_inference_steps or self.variant.default_steps
        guidance = self.variant.default_guidance if config.guidance is None else config.guidance
        if latents is not None:  # checked before the (slow) text encoding
            latents = mx.array(np.asarray(latents) if not isinstance(latents, mx.array) else latents)
            if plan is not None:
                self._check_latents(latents, plan)
            latents = latents.astype(self.dtype)
            if not mx.isfinite(latents).all().item():
                raise ValueError("the given latents hold NaN or infinite values")
        timings = {}

        t0 = time.perf_counter()
        txt, pooled = self.encode_prompt(prompt)
        timings["text_encoding"] = time.perf_counter() - t0

        if plan is None:
            self._load_staged(timings)
            plan = plan_inputs(config, self.variant, self.conditioning)
            self._check_size(plan)
            if latents is not None:
                self._check_latents(latents, plan)
        h, w = plan.height, plan.width
        rows, cols = sampler.latent_grid(h, w)
        sigmas = sampler.schedule(steps, rows * cols, shift=self.is_guidance_distilled)
        skip = 0
        if plan.image_strength:
            skip = conditioning.start_step(steps, plan.image_strength)
            if skip >= steps:
                raise ValueError(f"image_strength {plan.image_strength} skips all {steps} steps: lower it or "
                                 "give more steps")
        noise = latents if latents is not None else sampler.initial_noise(seed, h, w, self.dtype)

        # The VAE is resident: images are encoded now, after the text encoders are freed and before
        # the transformer is loaded (low_memory), so no two large models share the peak.
        t0 = time.perf_counter()
        self._encodings_used = set()
        x, cond = self.prepare_latents(plan, noise, float(sigmas[skip])), self.prepare_conditioning(plan)
        self._encodings = {k: v for k, v in self._encodings.items() if k in self._encodings_used}
        if plan.mode != "txt2img":
            mx.eval(x, *(a for a in (cond.channels, *(cond.tokens or ())) if a is not None))
            timings["image_encoding"] = time.perf_counter() - t0
        self._load_staged(timings)
        if conditioning_of(self.variant, self.input_channels) != plan.conditioning:  # a LoRA changed img_in
            plan_inputs(config, self.variant, self.conditioning)  # raises what is missing or extra
        guidance_in = mx.array([guidance], dtype=mx.float32) if self.is_guidance_distilled else None

        t0 = time.perf_counter()
        x = self.denoise(x, txt, pooled, sigmas[skip:], guidance_in, cond, sampler.image_ids(h, w),
                         progress=progress)
        timings["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pixels = self.decode(x, h, w, progress=progress)
        timings["decoding"] = time.perf_counter() - t0
        used = Config(num_inference_steps=steps, height=h, width=w, guidance=guidance,
                      image_path=config.image_path if plan.image is not None else None,
                      image_strength=plan.image_strength, mask_path=config.mask_path,
                      outpaint=config.outpaint, control_image_path=config.control_image_path,
                      auto_resize=config.auto_resize)
        return GeneratedImage(
            image=Image.fromarray(pixels), seed=None if latents is not None else int(seed), prompt=prompt,
            config=used, model=self.variant.alias, precision=self.precision,
            quantization=self.quantization, loras=self.lora_info(), timings=timings,
            uses_guidance=self.is_guidance_distilled, latents_given=latents is not None,
            mode=plan.mode, inputs=plan.records(),
        )

    def _load_staged(self, timings: dict) -> None:
        if self._transformer is None:  # low_memory: first loaded now, after the text encoders are freed
            self._load_transformer()
            timings["load_transformer"] = self.timings["load_transformer"]

    @staticmethod
    def _check_latents(latents: mx.array, plan: Inputs) -> None:
        rows, cols = sampler.latent_grid(plan.height, plan.width)
        want = (1, rows * cols, 4 * sampler.LATENT_CHANNELS)
        if tuple(latents.shape) != want:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {want} for "
                             f"{plan.width}x{plan.height}")

    # -- stages ----------------------------------------------------------------------------------------

    def encode_image(self, pixels: mx.array) -> mx.array:
        """(1, H, W, 3) pixels in [-1, 1] -> packed posterior-mean latents (1, H/16 * W/16, 64), float32."""
        return sampler.pack(self.vae.encode_latents(pixels.astype(self.dtype)))

    def _encoded(self, key: tuple, pixels) -> mx.array:
        """`encode_image(pixels())`, kept while the same input (file digest, size, role) comes again."""
        self._encodings_used.add(key)
        if key not in self._encodings:
            self._encodings[key] = self.encode_image(pixels())
        return self._encodings[key]

    @staticmethod
    def _input_key(role: str, plan: Inputs, *inputs, size: tuple[int, int] | None = None) -> tuple:
        digests = tuple(i.sha256 if i is not None else None for i in inputs)
        return (role, digests, size or (plan.width, plan.height), plan.outpaint)

    def _fill_pixels(self, plan: Inputs) -> tuple[mx.array, mx.array]:
        """Fill's image and binary mask at the output size ((1, H, W, 3), (H, W)), outpainted if asked."""
        image = plan.image.image
        mask = plan.mask.image if plan.mask is not None else None
        if plan.outpaint:
            image, mask = conditioning.pad(image, mask, plan.outpaint)
        return (conditioning.image_pixels(image, plan.width, plan.height),
                conditioning.mask_pixels(mask, plan.width, plan.height))

    def prepare_latents(self, plan: Inputs, noise: mx.array, sigma: float) -> mx.array:
        """The latents denoising starts from: the noise, or (img2img, Fill with image_strength > 0) the
        encoded image noised to the first sigma of the truncated schedule."""
        if not plan.image_strength:  # 0 skips nothing: sigma 1 is pure noise, the image is not encoded
            return noise
        if plan.conditioning == "fill":
            encoded = self._encoded(self._input_key("fill image", plan, plan.image, plan.mask),
                                    lambda: self._fill_pixels(plan)[0])
        else:
            encoded = self._encoded(self._input_key("image", plan, plan.image), lambda: conditioning.image_pixels(
                plan.image.image, plan.width, plan.height))
        return conditioning.noised(encoded, noise, sigma)

    def prepare_conditioning(self, plan: Inputs) -> conditioning.Conditioning:
        """Kontext: reference tokens and ids; Fill: masked-image latents | packed mask; control: latents."""
        if plan.conditioning == "reference":
            w, h = plan.reference_size
            ref = self._encoded(self._input_key("reference", plan, plan.image, size=(w, h)),
                                lambda: conditioning.image_pixels(plan.image.image, w, h))
            return conditioning.Conditioning(tokens=(ref, conditioning.reference_ids(h, w)))
        if plan.conditioning == "fill":
            pixels, mask = self._fill_pixels(plan)
            masked = self._encoded(self._input_key("masked image", plan, plan.image, plan.mask),
                                   lambda: pixels * (1 - mask[None, :, :, None]))
            return conditioning.Conditioning(channels=mx.concatenate([masked, conditioning.pack_mask(mask)], -1))
        if plan.conditioning == "control":
            control = self._encoded(self._input_key("control", plan, plan.control), lambda: conditioning.image_pixels(
                plan.control.image, plan.width, plan.height))
            return conditioning.Conditioning(channels=control)
        return conditioning.Conditioning()

    def denoise(self, x: mx.array, txt: mx.array, pooled: mx.array, sigmas: np.ndarray,
                guidance: mx.array | None, cond: conditioning.Conditioning, img_ids: mx.array,
                progress: bool = True) -> mx.array:
        """Euler steps from sigmas[0] to sigmas[-1]; the conditioning joins the latents at every step."""
        steps = len(sigmas) - 1
        if self.group is not None:  # every rank feeds its share of the transformer the same inputs
            from ..parallel import from_main

            x, txt, pooled = from_main([x, txt, pooled], self.group)
        _, ids = cond.model_input(x, img_ids)
        txt_ids = sampler.text_ids(txt.shape[1])
        pe = self.transformer.position_embedding(ids, txt_ids)
        if self.step_hook is not None:
            self.step_hook(0, steps)
        with StepBufferCache() as buffers:
            return self._euler_steps(x, txt, pooled, sigmas, guidance, cond, img_ids, ids, txt_ids, pe, progress,
                                     buffers)

    def _euler_steps(self, x, txt, pooled, sigmas, guidance, cond, img_ids, ids, txt_ids, pe, progress,
                     buffers: StepBufferCache) -> mx.array:
        steps, n = len(sigmas) - 1, x.shape[1]
        for i in tqdm(range(steps), desc="denoising", disable=not progress):
            t = mx.array([float(sigmas[i])], dtype=mx.float32)
            inp, _ = cond.model_input(x, img_ids)
            v = self.transformer(inp, txt, pooled, t, ids, txt_ids, guidance=guidance, pe=pe)
            if cond.tokens is not None:
                v = v[:, :n]  # the reference tokens' outputs are dropped
            x = sampler.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
            finite = mx.isfinite(x).all()
            mx.eval(x, finite)  # once per step: progress and timings are real; the check rides along
            buffers.step_done()
            if self.step_hook is not None:
                self.step_hook(i + 1, steps)
            if not finite.item():
                what = "NaN" if mx.isnan(x).any().item() else "infinite"
                raise NonFiniteError(
                    f"the latents became {what} at step {i + 1} of {steps}: a numeric overflow in "
                    f"{self.precision} (try --precision float32, or a lower LoRA strength) or broken weights")
        return x

    def decode(self, tokens: mx.array, height: int, width: int, progress: bool = False) -> np.ndarray:
        """Packed latents -> (H, W, 3) uint8 pixels; with `progress`, a bar advancing per conv strip."""
        z = self.vae.unscale_latents(sampler.unpack(tokens, height, width).astype(mx.float32))
        with tqdm(desc="decoding", unit="strip", disable=not progress) as bar:
            def advance(done: int, total: int):
                bar.total = total
                bar.update(done - bar.n)

            image = self.vae.decode(z.astype(self.dtype), progress=advance if progress else None)
            image = image[0].astype(mx.float32)
            image = mx.clip(image / 2 + 0.5, 0.0, 1.0)
            mx.eval(image)
        return np.round(np.array(image) * 255).astype(np.uint8)
