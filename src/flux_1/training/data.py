"""Training data: the images and captions of a folder, aspect buckets, pixels, the on-disk cache of latents
and prompt embeddings, and the seeded order batches are drawn in.

- Discovery: the images at the top of the folder (png, jpg, jpeg, webp, bmp), captioned by a
  `metadata.jsonl` (Hugging Face imagefolder: one `{"file_name": ..., "text": ...}` per line), else by a
  same-name `.txt` (kohya / ai-toolkit), else by the one instance prompt (`caption`). `trigger` is prepended
  to every caption (`"TOK, a photo"`) unless it already starts with it. An image that cannot be read is
  skipped with a warning naming it; a caption file without an image is a warning naming it; no image left,
  or an image without any caption, is a `DataError`.
- Buckets: sizes of multiples of 64 whose area is within 10% of resolution^2, sides from resolution/2 to
  2 x resolution (aspect up to 4:1). Each image goes to the bucket
  nearest its aspect ratio, is resized to cover it (Lanczos) and centre-cropped. An image smaller than its
  bucket is upscaled, with a warning naming it. With `flip`, the mirrored image is a sample of its own (its
  own cached latents), so each epoch sees both.
- Cache: `cache/latents/<key>.safetensors` (the VAE posterior mean, (h, w, 16), float32) and
  `cache/prompts/<key>.safetensors` (T5 states (L, C) and CLIP pooled (768,)). Keys hash everything the
  result depends on (the image's bytes, bucket, flip; the caption; the model's identity and precision), so a
  changed input gives a new key and stale entries are simply not used. Entries are written atomically.
- Order: an epoch shuffles each bucket (seeded by (seed, epoch)), cuts it into global batches (a short last
  batch is filled with the bucket's first samples of that epoch), and shuffles the batches. Micro-batch m is
  batch m mod len(epoch) of epoch m // len(epoch): a pure function of (seed, m), so resuming needs no state
  beyond the step, and every rank of a data-parallel run computes the same global batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_STEP = 64  # pixels: 8 latent cells x the VAE's factor 8; a multiple of the 16-pixel token
VAE_FACTOR = 8
AREA_TOLERANCE = 0.1  # a bucket's area is within 10% of resolution^2
CACHE_VERSION = "1"  # bump when what is cached changes meaning


class DataError(ValueError):
    """Training data that cannot be used: named, with what to do."""


@dataclass(frozen=True)
class Example:
    """One image of the folder: where it is, its caption, its bytes' digest and its size."""

    path: Path
    caption: str
    sha256: str
    size: tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Sample:
    """What one training sample is made of: an example, its bucket, whether it is mirrored, and its cache keys."""

    example: Example
    bucket: tuple[int, int]  # (width, height) in pixels
    flip: bool
    latent_key: str
    prompt_key: str


# -- discovery -------------------------------------------------------------------------------------------


def _read_image(path: Path) -> tuple[Image.Image, str]:
    """Fully decoded RGB image (EXIF orientation applied) and the SHA-256 of the file's bytes."""
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")
    return image, hashlib.sha256(data).hexdigest()


def _metadata_captions(folder: Path) -> dict[str, str] | None:
    """{file name: text} from metadata.jsonl, or None when there is none."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return None
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{path} line {number} has no \"file_name\" string")
        text = row.get("text", "")
        if not isinstance(text, str):
            raise DataError(f"{path} line {number}: \"text\" must be a string")
        if not (folder / row["file_name"]).is_file():
            warnings.warn(f"{path} line {number}: {row['file_name']} does not exist: skipped", stacklevel=3)
            continue
        captions[row["file_name"]] = text
    return captions


def with_trigger(caption: str, trigger: str | None) -> str:
    if not trigger or caption == trigger or caption.startswith(trigger + ","):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def discover(folder: str | Path, caption: str | None = None, trigger: str | None = None) -> list[Example]:
    """The captioned, readable images of `folder`, sorted by file name (see the module docstring)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.stem for p in images}
    for orphan in (p for p in files if p.suffix == ".txt" and p.stem not in stems):
        warnings.warn(f"caption file {orphan} has no image beside it: ignored", stacklevel=2)
    if not images:
        raise DataError(f"data folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    metadata = _metadata_captions(folder)
    examples, uncaptioned = [], []
    for path in images:
        text = metadata.get(path.name) if metadata is not None else None
        if text is None and path.with_suffix(".txt").is_file():
            text = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        text = (text or "").strip() or caption or ""
        text = with_trigger(text.strip(), trigger)
        if not text:
            uncaptioned.append(path.name)
            continue
        try:
            image, digest = _read_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            warnings.warn(f"image {path} is not readable ({e}): skipped", stacklevel=2)
            continue
        examples.append(Example(path, text, digest, image.size))
    if uncaptioned:
        shown = ", ".join(uncaptioned[:3]) + (f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else "")
        raise DataError(f"no caption for {shown} in {folder}: add a .txt of the same name, a metadata.jsonl, "
                        "or give --caption")
    if not examples:
        raise DataError(f"no readable image left in {folder}")
    return examples


# -- buckets and pixels ----------------------------------------------------------------------------------


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of 64, area within 10% of resolution^2, sides in [resolution/2,
    2 resolution]; for each width the height nearest the area."""
    if resolution < BUCKET_STEP or resolution % BUCKET_STEP:
        raise DataError(f"resolution must be a multiple of {BUCKET_STEP} (at least {BUCKET_STEP}), got {resolution}")
    area = resolution * resolution
    lowest = max(BUCKET_STEP, resolution // 2 // BUCKET_STEP * BUCKET_STEP)
    sizes = set()
    for width in range(lowest, 2 * resolution + 1, BUCKET_STEP):
        height = round(area / width / BUCKET_STEP) * BUCKET_STEP
        if lowest <= height <= 2 * resolution and abs(width * height / area - 1) <= AREA_TOLERANCE:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger area)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket (Lanczos), then centre-crop to it."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, resample=Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def pixels(image: Image.Image, flip: bool = False) -> mx.array:
    """PIL RGB image -> (1, H, W, 3) float32 in [-1, 1], mirrored left-right with `flip`."""
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return mx.array(x)[None]


# -- samples and cache keys ------------------------------------------------------------------------------


def digest(*parts) -> str:
    """A cache key: the hash of JSON-able parts (and the cache format's version)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:32]


def prompt_key(caption: str, model_key: str) -> str:
    return digest("prompt", caption, model_key)


def make_samples(examples: Sequence[Example], resolution: int, flip: bool, model_key: str) -> list[Sample]:
    """Every example in its bucket (and mirrored, with `flip`); warns once about each upscaled image."""
    buckets = bucket_sizes(resolution)
    samples = []
    for example in examples:
        bucket = nearest_bucket(example.size, buckets)
        if example.size[0] < bucket[0] or example.size[1] < bucket[1]:
            warnings.warn(f"image {example.path} is {example.size[0]}x{example.size[1]}, smaller than its "
                          f"{bucket[0]}x{bucket[1]} bucket: upscaled", stacklevel=2)
        caption_key = prompt_key(example.caption, model_key)
        for mirrored in (False, True) if flip else (False,):
            latent_key = digest("latent", example.sha256, bucket, mirrored, model_key)
            samples.append(Sample(example, bucket, mirrored, latent_key, caption_key))
    return samples


def data_fingerprint(examples: Sequence[Example], resolution: int, flip: bool) -> str:
    """What a resumed run must see again: the files (name, bytes), captions, resolution and flip."""
    return digest([(e.path.name, e.sha256, e.caption) for e in examples], resolution, flip)


# -- the cache -------------------------------------------------------------------------------------------


class Cache:
    """The latents and prompt embeddings of the samples, one safetensors file per key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def latent_file(self, key: str) -> Path:
        return self.folder / "latents" / f"{key}.safetensors"

    def prompt_file(self, key: str) -> Path:
        return self.folder / "prompts" / f"{key}.safetensors"

    def missing(self, samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, str]]:
        """(samples whose latents are not cached, {prompt key: caption} not cached)."""
        latents = [s for s in samples if not self.latent_file(s.latent_key).is_file()]
        prompts = {s.prompt_key: s.example.caption for s in samples if not self.prompt_file(s.prompt_key).is_file()}
        return latents, prompts

    def store_prompt(self, key: str, txt: mx.array, pooled: mx.array) -> None:
        """Cache one caption's ((1, L, C) T5 states, (1, 768) pooled)."""
        self._write(self.prompt_file(key), {"txt": txt[0], "pooled": pooled[0]})

    @staticmethod
    def _write(path: Path, arrays: dict[str, mx.array]) -> None:
        from ..loading.saved import writing

        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique temporary name per writer: ranks sharing the folder never clobber a half-written file.
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.safetensors")
            try:
                mx.save_safetensors(str(tmp), arrays)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def fill(self, samples: Sequence[Sample], encode_image: Callable[[mx.array], mx.array],
             encode_text: Callable[[str], tuple[mx.array, mx.array]], progress=None) -> int:
        """Encode and store what is missing; returns how many entries were written.

        `encode_image`: (1, H, W, 3) pixels in [-1, 1] -> (1, H/8, W/8, 16) latents; `encode_text`: caption ->
        ((1, L, C) T5 states, (1, 768) pooled). `progress(n)` is called after each entry."""
        latents, prompts = self.missing(samples)
        images: dict[Path, Image.Image] = {}
        for sample in latents:
            path = sample.example.path
            if path not in images:
                try:
                    images = {path: _read_image(path)[0]}  # one decoded image at a time
                except OSError as e:
                    raise DataError(f"image {path} can no longer be read ({e})") from None
            z = encode_image(pixels(fit(images[path], sample.bucket), sample.flip))
            mx.eval(z)
            self._write(self.latent_file(sample.latent_key), {"latents": z[0].astype(mx.float32)})
            if progress:
                progress(1)
        for key, caption in prompts.items():
            txt, pooled = encode_text(caption)
            mx.eval(txt, pooled)
            self.store_prompt(key, txt, pooled)
            if progress:
                progress(1)
        return len(latents) + len(prompts)

    def load_batch(self, samples: Sequence[Sample]) -> tuple[mx.array, mx.array, mx.array]:
        """(latents (B, h, w, 16), T5 states (B, L, C), pooled (B, 768)) of samples sharing one bucket."""
        latents, txt, pooled = [], [], []
        for sample in samples:
            latents.append(mx.load(str(self.latent_file(sample.latent_key)))["latents"])
            prompt = mx.load(str(self.prompt_file(sample.prompt_key)))
            txt.append(prompt["txt"])
            pooled.append(prompt["pooled"])
        return mx.stack(latents), mx.stack(txt), mx.stack(pooled)


# -- order -----------------------------------------------------------------------------------------------


class DataOrder:
    """The global batches, epoch after epoch, as a pure function of the seed (see the module docstring)."""

    def __init__(self, samples: Sequence[Sample], global_batch: int, seed: int):
        if global_batch < 1:
            raise DataError(f"the batch size must be at least 1, got {global_batch}")
        self.global_batch, self.seed = global_batch, seed
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(samples):
            self.buckets.setdefault(sample.bucket, []).append(i)
        self.batches_per_epoch = sum(math.ceil(len(v) / global_batch) for v in self.buckets.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, number: int) -> list[list[int]]:
        """The global batches of one epoch: indices into the samples, each batch within one bucket."""
        if self._epoch is None or self._epoch[0] != number:
            rng = np.random.default_rng([self.seed, number])
            batches = []
            for bucket in sorted(self.buckets):
                members = [self.buckets[bucket][i] for i in rng.permutation(len(self.buckets[bucket]))]
                padded = members * math.ceil(self.global_batch / len(members))  # a bucket smaller than a batch
                for start in range(0, len(members), self.global_batch):
                    chunk = members[start:start + self.global_batch]
                    chunk += padded[:self.global_batch - len(chunk)]  # a short last batch: refilled from the start
                    batches.append(chunk)
            self._epoch = (number, [batches[i] for i in rng.permutation(len(batches))])
        return self._epoch[1]

    def batch(self, micro_step: int) -> list[int]:
        """The global batch of micro-batch `micro_step` (counted from 0 over the whole run)."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return self.epoch(epoch)[index]

    def position(self, micro_step: int) -> dict:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return {"micro_step": micro_step, "epoch": epoch, "batch_in_epoch": index}
