"""What a generated image records about itself, and writing it to disk safely.

Every PNG carries two text chunks:
- `parameters`: the AUTOMATIC1111 "infotext" that Civitai, the A1111/Forge "PNG Info" tab and image
  browsers parse: the prompt, then one line of `Key: value` pairs (values with a comma, colon or
  newline are JSON-quoted, as A1111 does). FLUX has no real CFG, so `CFG scale: 1`, and dev's
  guidance is `Distilled CFG Scale` as in Forge.
- `flux_1`: the same facts as JSON, for programs (`read_png_metadata` reads both back).
Pillow writes `tEXt` (Latin-1) and falls back to `iTXt` (UTF-8) for any other text.

Files are written to a temporary name in the target folder and then renamed, so a crash never
leaves a partial image; an existing file is never replaced unless asked (`name_1.png`, ...).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:
    from .flux1 import GeneratedImage

PARAMETERS_KEY = "parameters"
JSON_KEY = "flux_1"
SAMPLER = "Euler"


def package_version() -> str:
    from .. import __version__

    return __version__


def lora_label(lora: dict) -> str:
    """A LoRA's short name: its `name`, else its file's stem."""
    if lora.get("name"):
        return str(lora["name"])
    return Path(str(lora.get("path", "lora"))).stem


def quantization_label(quantization: dict | None) -> str | None:
    if not quantization:
        return None
    mode = quantization.get("mode", "affine")
    return f"{quantization['bits']}-bit" if mode == "affine" else mode


def image_metadata(image: GeneratedImage) -> dict:
    """The facts needed to reproduce `image` (JSON-serialisable).

    - `guidance` is the guidance actually used: null when the transformer has no guidance embedder
      (schnell, or dev loaded onto schnell weights).
    - `seed` is null and `latents` is "given" when the image started from given latents (the seed was
      not used); otherwise `latents` is absent.
    - LoRAs baked into a saved folder's weights are listed with `"baked": true`.
    - Image-conditioned images add `mode` (img2img, kontext, fill, control) and `inputs`: each input
      file (image, mask, control_image) by name and SHA-256; img2img and Fill add `image_strength`,
      Fill with outpainting `outpaint` ([top, right, bottom, left]), Kontext `auto_resize`.
    """
    from .variants import VARIANTS

    config = image.config
    uses_guidance = image.uses_guidance
    if uses_guidance is None:
        uses_guidance = image.model in VARIANTS and VARIANTS[image.model].guidance_distilled
    meta = {
        "prompt": image.prompt,
        "model": image.model,
        "seed": None if image.latents_given else image.seed,
        "steps": config.num_inference_steps,
        "guidance": config.guidance if uses_guidance else None,
        "width": config.width,
        "height": config.height,
        "sampler": SAMPLER,
        "precision": image.precision,
        "quantization": image.quantization,
        "loras": [_lora_entry(lora) for lora in image.loras],
        "timings": {k: round(v, 3) for k, v in image.timings.items()},
        "version": package_version(),
    }
    if image.latents_given:
        meta["latents"] = "given"
    if image.mode != "txt2img":
        meta["mode"] = image.mode
        meta["inputs"] = {k: dict(v) for k, v in image.inputs.items()}
        if config.image_strength is not None:
            meta["image_strength"] = config.image_strength
        if config.outpaint is not None:
            meta["outpaint"] = list(config.outpaint)
        if image.mode == "kontext":
            meta["auto_resize"] = config.auto_resize
    return meta


def _lora_entry(lora: dict) -> dict:
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in lora.items()}
    plain = {k: v for k, v in plain.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {**plain, "name": lora_label(lora), "scale": float(lora.get("scale", 1.0))}


def _quote(value) -> str:
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_number(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(meta: dict) -> str:
    """The A1111 `parameters` text for `image_metadata(...)`'s dict."""
    fields = [("Steps", meta["steps"]), ("Sampler", meta.get("sampler", SAMPLER)), ("CFG scale", 1)]
    if meta.get("guidance") is not None:
        fields.append(("Distilled CFG Scale", format_number(meta["guidance"])))
    if meta.get("seed") is not None:  # no seed when the image started from given latents
        fields.append(("Seed", meta["seed"]))
    fields += [
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model", f"flux1-{meta['model']}"),
    ]
    if meta.get("image_strength") is not None:
        # A1111's img2img/inpaint "Denoising strength" is the fraction of the schedule run: 1 - ours.
        fields.append(("Denoising strength", format_number(round(1 - meta["image_strength"], 6))))
    quant = quantization_label(meta.get("quantization"))
    if quant:
        fields.append(("Quantization", quant))
    live = [lora for lora in meta.get("loras") or [] if not lora.get("baked")]
    baked = [lora for lora in meta.get("loras") or [] if lora.get("baked")]
    for key, loras in (("LoRAs", live), ("Baked LoRAs", baked)):
        if loras:
            fields.append((key, ", ".join(f"{lora['name']}: {format_number(lora['scale'])}" for lora in loras)))
    fields.append(("Version", f"flux_1 {meta['version']}"))
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields)
    return f"{meta['prompt']}\n{line}"


def to_json(meta: dict, indent: int | None = None) -> str:
    """JSON text of the metadata; a NaN or infinity (which JSON cannot hold) is a ValueError."""
    try:
        return json.dumps(meta, ensure_ascii=False, indent=indent, allow_nan=False)
    except ValueError:
        bad = [k for k, v in meta.items() if isinstance(v, float) and not math.isfinite(v)]
        raise ValueError(f"the image metadata holds a non-finite number ({', '.join(bad) or 'nested'}): "
                         "nothing was written") from None


def png_info(meta: dict) -> PngInfo:
    info = PngInfo()
    text = to_json(meta)  # first: a NaN stops here, before any text chunk is made
    info.add_text(PARAMETERS_KEY, a1111_parameters(meta))
    info.add_text(JSON_KEY, text)
    return info


def read_png_metadata(path: str | Path) -> dict:
    """{"parameters": str, "flux_1": dict} from a PNG written by `save_png` (missing keys omitted)."""
    with Image.open(path) as im:
        text = dict(im.text)
    out = {}
    if PARAMETERS_KEY in text:
        out[PARAMETERS_KEY] = text[PARAMETERS_KEY]
    if JSON_KEY in text:
        out[JSON_KEY] = json.loads(text[JSON_KEY])
    return out


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def numbered(path: Path, n: int) -> Path:
    return path if n == 0 else path.with_name(f"{path.stem}_{n}{path.suffix}")


def _temp_file(folder: Path, name: str) -> Path:
    """A new empty hidden file beside the target (created with the umask's permissions, unlike mkstemp)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_file(path.parent, path.name)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, target: Path) -> bool:
    """Give `tmp`'s content the name `target` unless it exists (hard link: race-free); False if taken."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links (e.g. exFAT): check, then rename a copy of the name
        if target.exists():
            return False
        os.replace(tmp, target)
        return True


def publish(png_tmp: Path, path: Path, overwrite: bool, json_tmp: Path | None = None) -> Path:
    """Publish a finished PNG (and its finished JSON sidecar) under `path`, or the first free `path_N`
    unless `overwrite`: with a sidecar, both names are claimed or neither (a claimed PNG whose sidecar
    cannot be published is removed). The temp files are left for the caller to remove."""
    if overwrite:
        if json_tmp is not None:
            os.replace(json_tmp, sidecar_path(path))
        os.replace(png_tmp, path)
        return path
    n = 0
    while True:
        candidate = numbered(path, n)
        n += 1
        if json_tmp is not None and sidecar_path(candidate).exists():
            continue
        if not _claim(png_tmp, candidate):
            continue
        if json_tmp is None:
            return candidate
        try:
            claimed = _claim(json_tmp, sidecar_path(candidate))
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        if claimed:
            return candidate
        candidate.unlink(missing_ok=True)  # another process took the sidecar name: try the next pair


def save_png(image: GeneratedImage, path: str | Path, overwrite: bool = False, sidecar: bool = False) -> Path:
    """Write `image` with its metadata to `path` (a .png; parent folders are created); returns the path
    actually written, which differs from `path` when that name was taken and `overwrite` is off.
    With `sidecar`, the metadata is also written as JSON next to it (`name.json`). Both files are
    written to temporary names first and published together: a failure (a full disk, a NaN in the
    metadata) leaves neither."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output file {path} must end in .png")
    meta = image_metadata(image)
    info = png_info(meta)  # a NaN in the metadata is refused before anything is written
    sidecar_text = (to_json(meta, indent=2) + "\n").encode() if sidecar else None
    path.parent.mkdir(parents=True, exist_ok=True)
    temps = [_temp_file(path.parent, path.name)]
    try:
        image.image.save(temps[0], format="PNG", pnginfo=info)
        if not sidecar:
            return publish(temps[0], path, overwrite)
        temps.append(_temp_file(path.parent, sidecar_path(path).name))
        temps[1].write_bytes(sidecar_text)
        return publish(temps[0], path, overwrite, json_tmp=temps[1])
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
