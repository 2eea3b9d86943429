"""Input images for image-conditioned generation: reading, resizing, masks, and the conditioning tensors.

Preprocessing follows diffusers (0.42.1) step for step, so the same file gives the same tensors as
`diffusers.utils.load_image` followed by FluxImg2ImgPipeline, FluxKontextPipeline, FluxFillPipeline or
FluxControlPipeline:
- every file: EXIF orientation applied, then converted to RGB (load_image; a 16-bit depth map is first
  scaled to 8 bits, which PIL's conversion would clip);
- images: PIL resize to the target size with Lanczos (a same-size resize is a copy), in the file's own
  mode, then converted to RGB, /255, then 2x - 1;
- masks: PIL Lanczos resize in the file's own mode, then converted to L (grayscale), /255, then binarized
  (>= 0.5 is 1: white is repainted), not normalized;
- Kontext: the reference is resized to the preferred resolution nearest its aspect ratio (as diffusers and
  BFL), then to multiples of 16.

Shapes: images (1, H, W, 3) channels-last in [-1, 1]; latents (1, H/8, W/8, 16); packed tokens
(1, H/16 * W/16, C * 4) in diffusers' layout (see sampler.pack).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from . import sampler

# (width, height) pairs Kontext was trained at: diffusers' PREFERRED_KONTEXT_RESOLUTIONS (from BFL).
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
MULTIPLE = sampler.VAE_FACTOR * sampler.PATCH  # 16 pixels per packed token
OUTPAINT_GREY = (128, 128, 128)  # padding colour; masked to 0 anyway in the masked image, see `pad`


class InputImageError(ValueError):
    """An input image, mask or control image that cannot be used: named, with the reason."""


@dataclass
class InputImage:
    """A file read once: its pixels, and what the metadata records (file name, SHA-256 of the bytes)."""

    path: Path
    image: Image.Image
    sha256: str

    def record(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256}


def read_image(path: str | Path, what: str) -> InputImage:
    """Read and fully decode an image file; every failure is an InputImageError naming `what` and the file."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputImageError(f"{what} {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputImageError(f"{what} {path} is not readable ({e.strerror or e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # a truncated file fails now, not after the model has loaded
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit depth maps: scale, do not clip
                wide = np.asarray(image, dtype=np.float64)
                top = 65535.0 if wide.max() > 255 else 255.0
                image = Image.fromarray(np.round(wide / top * 255).clip(0, 255).astype(np.uint8), "L")
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputImageError(f"{what} {path} is not a readable image ({e})") from None
    if image.width < MULTIPLE or image.height < MULTIPLE:
        raise InputImageError(f"{what} {path} is {image.width}x{image.height}: at least {MULTIPLE}x{MULTIPLE} "
                              "pixels are needed")
    return InputImage(path, image, hashlib.sha256(data).hexdigest())


# -- sizes -----------------------------------------------------------------------------------------------


def round_down(width: int, height: int) -> tuple[int, int]:
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def kontext_size(width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
    """(width, height) the Kontext reference is encoded at: the preferred resolution nearest in aspect
    ratio (ties: the smaller width, as diffusers' `min` over (distance, w, h)), then multiples of 16."""
    if auto_resize:
        # diffusers first rounds the image size down to multiples of 16 (get_default_height_width).
        w16, h16 = round_down(width, height)
        aspect = w16 / h16
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return round_down(width, height)


def outpaint_size(width: int, height: int, outpaint: tuple[int, int, int, int] | None) -> tuple[int, int]:
    if not outpaint:
        return width, height
    top, right, bottom, left = outpaint
    return width + left + right, height + top + bottom


# -- pixels ----------------------------------------------------------------------------------------------


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' VaeImageProcessor.resize: Lanczos in the image's own mode (PIL copies at the same size)."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_pixels(image: Image.Image, width: int, height: int) -> mx.array:
    """PIL image -> (1, height, width, 3) float32 in [-1, 1], resized first when its size differs."""
    rgb = resize(image, width, height).convert("RGB")
    x = np.asarray(rgb).astype(np.float32) / 255.0
    return mx.array(2.0 * x - 1.0)[None]


def mask_pixels(mask: Image.Image, width: int, height: int) -> mx.array:
    """PIL mask -> (height, width) float32 of 0 (keep) and 1 (repaint): resized, grayscale, binarized at 0.5."""
    grey = resize(mask, width, height).convert("L")
    m = np.asarray(grey).astype(np.float32) / 255.0
    return mx.array((m >= 0.5).astype(np.float32))


def pad(image: Image.Image, mask: Image.Image | None, outpaint: tuple[int, int, int, int]):
    """Outpainting: the image padded with grey, and the mask padded with white (repaint the padding).

    The padding colour never reaches the model as such: the masked image is image * (1 - mask), so
    the padding is 0 there; it only matters for img2img-style starts (image_strength > 0).
    With no mask, the original area is kept (black)."""
    top, right, bottom, left = outpaint
    w, h = image.width + left + right, image.height + top + bottom
    padded = Image.new("RGB", (w, h), OUTPAINT_GREY)
    padded.paste(image.convert("RGB"), (left, top))
    full = Image.new("L", (w, h), 255)
    inner = mask.convert("L").resize(image.size, Image.Resampling.LANCZOS) if mask is not None else \
        Image.new("L", image.size, 0)
    full.paste(inner, (left, top))
    return padded, full


# -- conditioning tensors ------------------------------------------------------------------------------


def pack_mask(mask: mx.array) -> mx.array:
    """(H, W) pixel mask -> (1, H/16 * W/16, 256): each latent pixel's 8x8 block of mask pixels as 64
    channels (index ky * 8 + kx), then packed 2x2 like latents: diffusers' prepare_mask_latents."""
    H, W = mask.shape
    f = sampler.VAE_FACTOR
    h, w = H // f, W // f
    m = mask.reshape(h, f, w, f).transpose(0, 2, 1, 3).reshape(1, h, w, f * f)  # (1, h, w, 64) channels-last
    return sampler.pack(m)


def reference_ids(height: int, width: int) -> mx.array:
    """Position ids of Kontext's reference tokens: the image grid, with the first axis 1 instead of 0."""
    ids = sampler.image_ids(height, width)
    return mx.concatenate([mx.ones_like(ids[:, :1]), ids[:, 1:]], axis=1)


@dataclass
class Conditioning:
    """What the denoising loop adds to the noisy latents at every step (both None for text to image).

    tokens: (latents (1, M, 64), ids (M, 3)) appended to the image sequence (Kontext); the transformer's
        output for them is dropped.
    channels: (1, N, C) concatenated to the latents' 64 channels (Fill: 320, Canny/Depth: 64).
    """

    tokens: tuple[mx.array, mx.array] | None = None
    channels: mx.array | None = None

    def model_input(self, x: mx.array, img_ids: mx.array) -> tuple[mx.array, mx.array]:
        """(latents with the conditioning, ids) for the transformer, in the latents' dtype."""
        if self.channels is not None:
            x = mx.concatenate([x, self.channels.astype(x.dtype)], axis=-1)
        if self.tokens is not None:
            ref, ref_ids = self.tokens
            x = mx.concatenate([x, ref.astype(x.dtype)], axis=1)
            img_ids = mx.concatenate([img_ids, ref_ids], axis=0)
        return x, img_ids


def start_step(num_steps: int, image_strength: float) -> int:
    """Steps skipped for img2img, exactly as diffusers' get_timesteps with strength = 1 - image_strength
    (int() truncates: e.g. 10 steps at image_strength 0.35 skip 3)."""
    strength = 1 - image_strength
    init_timestep = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_timestep, 0))


def noised(image_latents: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """sigma * noise + (1 - sigma) * image, in float32: FlowMatchEulerDiscreteScheduler.scale_noise."""
    s = mx.array(sigma, dtype=mx.float32)
    out = s * noise.astype(mx.float32) + (1.0 - s) * image_latents.astype(mx.float32)
    return out.astype(noise.dtype)
