"""`Flux1`: load the four models, encode the prompt, denoise, decode."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import quantization as q
from ..components import default_precision, precision_dtype, require_tokenizers
from ..loading import load_component
from . import sampler
from .variants import Variant, variant


@dataclass
class Config:
    num_inference_steps: int | None = None  # None: the model's default (schnell 4, dev 25)
    height: int = 1024
    width: int = 1024
    guidance: float = 3.5  # dev only; schnell has no guidance embedder and ignores it

    def __post_init__(self):
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16:
                raise ValueError(f"{name} must be at least 16 pixels, got {value}")
            if value % 16:
                rounded = value // 16 * 16
                warnings.warn(f"{name} {value} is not a multiple of 16: using {rounded}", stacklevel=3)
                setattr(self, name, rounded)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    prompt: str
    config: Config
    model: str
    precision: str
    quantization: dict | None
    loras: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict:
        from .metadata import image_metadata

        return image_metadata(self)

    def save(self, path: str | Path, overwrite: bool = False, sidecar: bool = False) -> Path:
        from .metadata import save_png

        return save_png(self, Path(path), overwrite=overwrite, sidecar=sidecar)


class Flux1:
    """FLUX.1 schnell or dev: text encoders, transformer and VAE, loaded from one folder.

    Components are built from the weights' own shapes. With `low_memory`, the text encoders are
    released after each prompt is encoded (and reloaded for a new prompt) and the transformer is
    loaded only after the first prompt is encoded, so peak memory is the largest stage (text encoding,
    or denoising) rather than the sum of all models.
    """

    def __init__(self, root: Path, variant: Variant, precision: str | None = None,
                 quantize: int | str | None = None, low_memory: bool = False,
                 lora_paths: list[str] | None = None, lora_scales: list[float] | None = None,
                 lora_merge: bool = True):
        precision = precision or default_precision()
        self.dtype = precision_dtype(precision)
        self.root, self.variant, self.precision = Path(root), variant, precision
        self.low_memory = low_memory
        self.lora_merge = lora_merge
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.quant_spec = q.parse(quantize)
        self._prompt_cache: dict[str, tuple[mx.array, mx.array]] = {}
        self.loras = None
        self._transformer = None
        self.vae = self._load("vae")
        self.t5 = self.clip = None
        self._load_text_encoders()
        if not low_memory or lora_paths:  # LoRAs are checked against the transformer at once
            self._load_transformer()
        self.timings["load"] = time.perf_counter() - t0
        if lora_paths:
            self.set_loras(lora_paths, lora_scales)

    @property
    def transformer(self):
        """The FLUX transformer; with `low_memory` it is first loaded after the first prompt is encoded,
        so the text encoders and the transformer are never resident together."""
        if self._transformer is None:
            self._load_transformer()
        return self._transformer

    def _load_transformer(self):
        t0 = time.perf_counter()
        self._transformer = self._load("transformer")
        self.timings["load_transformer"] = time.perf_counter() - t0
        has_guidance = self._transformer.params.guidance_embed
        if has_guidance != self.variant.guidance_distilled:
            holds = "a guidance-distilled (dev-like)" if has_guidance else "a schnell-like (no guidance embedder)"
            warnings.warn(f"{self.root} holds {holds} transformer; loaded as {self.variant.alias!r}", stacklevel=3)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_alias(cls, alias: str, path: str | Path | None = None, quantize: int | str | None = None,
                   lora_paths: list[str] | None = None, lora_scales: list[float] | None = None,
                   precision: str | None = None, low_memory: bool = False, lora_merge: bool = True) -> Flux1:
        facts = variant(alias)
        if path is None:
            from ..loading.hub import download

            root = download(facts.repo_id)
        else:
            root = Path(path)
            if not root.is_dir():
                raise FileNotFoundError(f"model path {root} does not exist or is not a folder")
        return cls(root, facts, precision=precision, quantize=quantize, low_memory=low_memory,
                   lora_paths=lora_paths, lora_scales=lora_scales, lora_merge=lora_merge)

    def _load(self, component: str):
        return load_component(self.root, component, self.dtype, self.quant_spec)

    def _load_text_encoders(self):
        from transformers import CLIPTokenizer, T5TokenizerFast

        require_tokenizers(self.root)
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(str(self.root / "tokenizer"))
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(str(self.root / "tokenizer_2"))
        self.clip = self._load("clip")
        self.t5 = self._load("t5")
        if self.loras is not None:
            self.loras.apply_text_encoder(self.clip)

    @property
    def is_guidance_distilled(self) -> bool:
        return self.transformer.params.guidance_embed

    @property
    def quantization(self) -> dict | None:
        from ..loading import saved

        if saved.is_saved_folder(self.root):  # the saved quantization wins over -q
            return self._saved_quantization()
        return self.quant_spec.as_dict() if self.quant_spec else self._saved_quantization()

    def _saved_quantization(self) -> dict | None:
        layers = q.describe(self.transformer)
        if not layers:
            return None
        first = next(iter(layers.values()))
        return {"bits": first["bits"], "group_size": first["group_size"], "mode": first["mode"]}

    # -- LoRA --------------------------------------------------------------------------------------

    def set_loras(self, paths: list[str], scales: list[float] | None = None):
        """Load LoRA files and apply them with the given strengths (replacing any applied before).

        Full-precision layers get the delta merged into W (computed in float32) when `lora_merge`
        (the default: no per-step cost); quantized layers always use an exact low-rank side path.
        With lora_merge=False every layer uses the side path, so strength changes and removal
        return bit-exactly to the base weights (compare.py's strength sweeps).
        """
        from ..lora import LoRAStack

        if scales is None:
            scales = [1.0] * len(paths)
        if len(scales) != len(paths):
            raise ValueError(f"got {len(scales)} LoRA scale(s) for {len(paths)} LoRA path(s)")
        if self.loras is not None:
            self.loras.remove(self.transformer, self.clip)
        self.loras = LoRAStack.load(paths, scales, self.transformer, self.clip, merge=self.lora_merge)
        self._prompt_cache.clear()

    def set_lora_scales(self, scales: list[float]):
        """Change LoRA strengths without reloading anything."""
        if self.loras is None:
            raise ValueError("no LoRA is applied")
        self.loras.set_scales(scales, self.transformer, self.clip)
        if self.loras.touches_text_encoder():
            self._prompt_cache.clear()

    def lora_info(self) -> list[dict]:
        return self.loras.info() if self.loras is not None else []

    # -- generation --------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[mx.array, mx.array]:
        """(T5 hidden states (1, L, 4096), CLIP pooled (1, 768)), cached per prompt."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        if prompt in self._prompt_cache:
            return self._prompt_cache[prompt]
        if self.t5 is None:
            self._load_text_encoders()
        clip_ids = self.clip_tokenizer(prompt, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="np").input_ids
        t5_ids = self.t5_tokenizer(prompt, padding="max_length", max_length=self.variant.max_sequence_length,
                                   truncation=True, return_tensors="np").input_ids
        _, pooled = self.clip(mx.array(clip_ids.astype(np.int32)))
        txt = self.t5(mx.array(t5_ids.astype(np.int32)))
        mx.eval(txt, pooled)
        self._prompt_cache = {prompt: (txt, pooled)}
        if self.low_memory:
            self.t5 = self.clip = None
            mx.clear_cache()
        return txt, pooled

    def generate_image(self, seed: int, prompt: str, config: Config | None = None,
                       latents=None, progress: bool = True) -> GeneratedImage:
        config = config or Config()
        steps = config.num_inference_steps or self.variant.default_steps
        h, w = config.height, config.width
        rows, cols = sampler.latent_grid(h, w)
        timings = {}

        t0 = time.perf_counter()
        txt, pooled = self.encode_prompt(prompt)
        timings["text_encoding"] = time.perf_counter() - t0

        if latents is None:
            x = sampler.initial_noise(seed, h, w, self.dtype)
        else:
            x = mx.array(np.asarray(latents) if not isinstance(latents, mx.array) else latents)
            want = (1, rows * cols, 4 * sampler.LATENT_CHANNELS)
            if tuple(x.shape) != want:
                raise ValueError(f"latents have shape {tuple(x.shape)}, expected {want} for {w}x{h}")
            x = x.astype(self.dtype)
        if self._transformer is None:  # low_memory: first loaded now, after the text encoders are freed
            self._load_transformer()
            timings["load_transformer"] = self.timings["load_transformer"]
        img_ids, txt_ids = sampler.image_ids(h, w), sampler.text_ids(txt.shape[1])
        pe = self.transformer.position_embedding(img_ids, txt_ids)
        sigmas = sampler.schedule(steps, rows * cols, shift=self.is_guidance_distilled)
        guidance = mx.array([config.guidance], dtype=mx.float32) if self.is_guidance_distilled else None

        t0 = time.perf_counter()
        for i in tqdm(range(steps), desc="denoising", disable=not progress):
            t = mx.array([float(sigmas[i])], dtype=mx.float32)
            v = self.transformer(x, txt, pooled, t, img_ids, txt_ids, guidance=guidance, pe=pe)
            x = sampler.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
            mx.eval(x)  # once per step: progress and timings are real
        timings["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pixels = self.decode(x, h, w)
        timings["decoding"] = time.perf_counter() - t0
        return GeneratedImage(
            image=Image.fromarray(pixels), seed=seed, prompt=prompt, config=Config(steps, h, w, config.guidance),
            model=self.variant.alias, precision=self.precision, quantization=self.quantization,
            loras=self.lora_info(), timings=timings,
        )

    def decode(self, tokens: mx.array, height: int, width: int) -> np.ndarray:
        """Packed latents -> (H, W, 3) uint8 pixels."""
        z = self.vae.unscale_latents(sampler.unpack(tokens, height, width).astype(mx.float32))
        image = self.vae.decode(z.astype(self.dtype))[0].astype(mx.float32)
        image = mx.clip(image / 2 + 0.5, 0.0, 1.0)
        mx.eval(image)
        return np.round(np.array(image) * 255).astype(np.uint8)

