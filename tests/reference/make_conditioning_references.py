"""Reference outputs of diffusers' image-conditioned FLUX.1 pipelines on the tiny fixtures (issue #10).

torch, CPU, float32, one thread. ``compute_conditioning_reference(workdir)`` writes the tiny checkpoints
(schnell, dev, dev-kontext, dev-fill, dev-canny, dev-depth; float32 with the BFL files) into ``workdir``,
proves diffusers loads each one strictly (``load_and_check``: zero missing / unexpected keys, the stored
values, the BFL file converting to the same weights) and with the right pipeline class, runs every case of
``CASES`` and returns a dict of arrays; ``main()`` saves it as ``tests/reference/conditioning_outputs.npz``.

Run: ``python tests/reference/make_conditioning_references.py`` (about a minute on 2 CPU cores).

How the reference is made deterministic (what our pipeline must reproduce)
--------------------------------------------------------------------------
* Every VAE *encoding* uses the posterior mean. diffusers samples in FluxImg2ImgPipeline and
  FluxFillPipeline (``retrieve_latents(..., sample_mode="sample")``) and in FluxControlPipeline
  (``vae.encode(control_image).latent_dist.sample(generator)``); FluxKontextPipeline already takes the
  mode (``sample_mode="argmax"``). Issue #10 specifies the mean, so ``DiagonalGaussianDistribution.sample``
  is patched to return ``self.mean`` while the references are computed (``_posterior_mean``).
* The initial noise is the packed array ``{case}.noise`` (1, N, 64), N = (H/16)*(W/16), drawn with
  ``np.random.default_rng(seed).standard_normal`` — exactly what our tests pass as ``latents=``.
  - txt-like modes (Kontext, Fill at strength 1, Canny/Depth): passed as ``latents=`` (packed).
  - img2img: FluxImg2ImgPipeline.prepare_latents returns ``latents`` untouched when given (the image
    would be ignored), so instead its module-level ``randn_tensor`` is patched to return the noise,
    *unpacked* to (1, 16, H/8, W/8) with diffusers' own ``_unpack_latents``. diffusers then computes
    ``pack(sigma_0 * noise + (1 - sigma_0) * encode(image))``, i.e. in packed space
    ``sigma_0 * noise_packed + (1 - sigma_0) * pack(image_latents)``.

Cases (all outputs non-square; images / masks are generated deterministically, see ``_make_*``)
-----------------------------------------------------------------------------------------------
``CASES`` maps a case name to its settings; keys in the npz are ``{case}.{field}``:

    {case}.variant / .mode / .prompt          () unicode  alias; img2img|kontext|fill|control; prompt
    {case}.height / .width / .steps           () int32    output size and num_inference_steps
    {case}.max_sequence_length                () int32    256 for schnell, 512 otherwise (our variants)
    {case}.guidance                           () float32  guidance (ignored by schnell)
    {case}.image_strength                     () float32  img2img only: ours; diffusers' strength = 1 - it
    {case}.diffusers_strength                 () float32  img2img only: the value given to diffusers
    {case}.auto_resize                        () bool     kontext only (diffusers' `_auto_resize`)
    {case}.image                              (h, w, 3) uint8  the input (img2img / kontext / fill) image
    {case}.mask                               (h, w) uint8     fill: the mask image (white = repaint)
    {case}.control_image                      (h, w, 3) uint8  control: the edge / depth map
    {case}.outpaint                           (4,) int32   fill outpaint cases: (top, right, bottom, left)
                                                           padding; .image / .mask are the padded inputs
                                                           and .unpadded_image the image before padding
    {case}.noise                              (1, N, 64) float32  packed initial noise
    {case}.transformer_timesteps              (k,) float32  the `timestep` given to the transformer at each
                                                           of the k steps actually run (= sigma; img2img: the
                                                           tail of the full schedule)
    {case}.sigmas                             (steps+1,) float32  the scheduler's full sigma list (dev's
                                                           resolution shift; img2img starts at index
                                                           t_start = int(steps - steps * strength))
    {case}.img_ids                            (N[+M], 3) float32  ids given to the transformer (Kontext:
                                                           output ids then reference ids with axis 0 = 1)
    {case}.hidden_states_0                    (1, N[+M], C) float32  transformer input at the first step
                                                           (C = 64, 384 Fill, 128 control; Kontext: the
                                                           reference tokens appended), small cases only
    {case}.output                             (H, W, 3) uint8  the image, round(x * 255) of diffusers' [0, 1]
    {case}.conditioning_effect                () int32     max |output - output with other conditioning|
                                                           (inverted mask, other image / flipped control map)
    kontext_sizes                             (K, 4) int32  (in_h, in_w, out_h, out_w): the size diffusers'
                                                           auto-resize gives a reference image of in_h x in_w
                                                           (the aspect ratio is taken AFTER rounding in_h, in_w
                                                           down to multiples of 16: 40x72 -> 32x64 -> 720x1456)
    versions                                  (k,) unicode
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NPZ_PATH = HERE / "conditioning_outputs.npz"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fixtures import make_tiny_checkpoints as tiny  # noqa: E402

# --------------------------------------------------------------------------------------------------------
# Deterministic input images (numpy only; the tests write them to PNG and read them back)
# --------------------------------------------------------------------------------------------------------


def _grid(h: int, w: int):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y / max(h - 1, 1), x / max(w - 1, 1)


def make_photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colourful picture with a few shapes and a little noise: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = _grid(h, w)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack(
        [
            0.5 + 0.35 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 2) + y * rng.uniform(0.2, 1)) + phase[c])
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(3):  # discs of random colour
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        inside = ((y - cy) * h) ** 2 + ((x - cx) * w) ** 2 < (r * min(h, w)) ** 2
        img[inside] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_mask(h: int, w: int, kind: str, seed: int = 0) -> np.ndarray:
    """(h, w) uint8 mask, 255 = repaint. kind: "box" (hard rectangle), "soft" (a blurred disc whose edge
    crosses the 0.5 threshold: checks the binarisation), "pad" is built by `pad_for_outpaint`."""
    y, x = _grid(h, w)
    if kind == "box":
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : h // 4 + h // 2, w // 3 : w // 3 + w // 3] = 255
        return m
    if kind == "soft":
        rng = np.random.default_rng(seed)
        cy, cx = rng.uniform(0.35, 0.65, 2)
        d = np.sqrt(((y - cy) * h) ** 2 + ((x - cx) * w) ** 2) / min(h, w)
        return (np.clip(1.5 - 3.0 * d, 0, 1) * 255).round().astype(np.uint8)
    raise ValueError(kind)


def make_edges(h: int, w: int, seed: int) -> np.ndarray:
    """A Canny-like control image: thin white lines on black, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    for _ in range(4):
        r = rng.integers(2, h - 2)
        img[r, :] = 255
        c = rng.integers(2, w - 2)
        img[:, c] = 255
    y, x = _grid(h, w)
    ring = np.abs(np.sqrt(((y - 0.5) * h) ** 2 + ((x - 0.5) * w) ** 2) - min(h, w) / 3) < 0.7
    img[ring] = 255
    return np.repeat(img[:, :, None], 3, axis=2)


def make_depth(h: int, w: int, seed: int) -> np.ndarray:
    """A depth-map-like control image: smooth grey levels (near = bright), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = _grid(h, w)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    d = 0.6 * (1 - y) + 0.4 * np.exp(-(((y - cy) / 0.25) ** 2 + ((x - cx) / 0.2) ** 2))
    g = (np.clip(d, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def pad_for_outpaint(image: np.ndarray, pad: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(padded image, mask) for outpainting by (top, right, bottom, left) pixels, the way diffusers users
    build them: the image pasted on a larger canvas, the mask white (255) exactly on the new border.

    The canvas colour does not matter for FluxFillPipeline at strength 1: the masked image is
    ``image * (1 - mask)`` (border -> 0) and the initial latents are the given noise. White is used."""
    top, right, bottom, left = pad
    h, w, _ = image.shape
    canvas = np.full((h + top + bottom, w + left + right, 3), 255, np.uint8)
    canvas[top : top + h, left : left + w] = image
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top : top + h, left : left + w] = 0
    return canvas, mask


# --------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------

PROMPTS = {
    "img2img": "an oil painting of a mountain lake, vivid colors",
    "kontext": "make it winter, snow on the trees",
    "fill": "a small red boat floating on a calm blue sea",
    "control": "a futuristic city at night with neon signs",
}

# height x width of the output; image sizes are (h, w). Strength / steps / guidance vary within a mode.
CASES: dict[str, dict] = {
    # img2img (FluxImg2ImgPipeline): image given at the output size, and one not a multiple of 16 that
    # diffusers resizes (PIL Lanczos) to height x width.
    "img2img.schnell.a": dict(variant="schnell", mode="img2img", height=64, width=96, steps=4,
                              image_strength=0.3, image_hw=(64, 96), seed=21),
    "img2img.schnell.b": dict(variant="schnell", mode="img2img", height=64, width=96, steps=4,
                              image_strength=0.55, image_hw=(70, 101), seed=22),
    "img2img.dev.a": dict(variant="dev", mode="img2img", height=80, width=48, steps=5, guidance=3.5,
                          image_strength=0.45, image_hw=(80, 48), seed=23),
    "img2img.dev.b": dict(variant="dev", mode="img2img", height=80, width=48, steps=3, guidance=4.0,
                          image_strength=0.65, image_hw=(80, 48), seed=24),
    # Kontext (FluxKontextPipeline): reference image appended as tokens with ids (1, row, col).
    # Without auto-resize the reference keeps its size rounded down to multiples of 16 (diffusers *resizes*
    # 52x84 to 48x80 with Lanczos, it does not crop). One case with auto-resize on (a preferred resolution).
    "kontext.a": dict(variant="dev-kontext", mode="kontext", height=64, width=96, steps=2, guidance=2.5,
                      image_hw=(48, 80), auto_resize=False, seed=31),
    "kontext.b": dict(variant="dev-kontext", mode="kontext", height=80, width=48, steps=3, guidance=3.5,
                      image_hw=(52, 84), auto_resize=False, seed=32),
    "kontext.auto": dict(variant="dev-kontext", mode="kontext", height=48, width=80, steps=1, guidance=2.5,
                         image_hw=(40, 72), auto_resize=True, seed=33),
    # Fill (FluxFillPipeline, strength 1): inpaint with a hard and a soft mask (thresholded at 0.5), one
    # mask given at half size (diffusers resizes it with Lanczos, then thresholds); outpaint by padding.
    "fill.box": dict(variant="dev-fill", mode="fill", height=80, width=48, steps=2, guidance=30.0,
                     image_hw=(80, 48), mask="box", seed=41),
    "fill.soft": dict(variant="dev-fill", mode="fill", height=64, width=96, steps=3, guidance=10.0,
                      image_hw=(64, 96), mask="soft", mask_hw=(32, 48), seed=42),
    "fill.outpaint": dict(variant="dev-fill", mode="fill", height=80, width=96, steps=2, guidance=30.0,
                          image_hw=(48, 64), outpaint=(16, 0, 16, 32), seed=43),
    # Canny / Depth (FluxControlPipeline): control latents concatenated on channels (128 in).
    "canny.a": dict(variant="dev-canny", mode="control", height=64, width=96, steps=2, guidance=30.0,
                    control="edges", control_hw=(64, 96), seed=51),
    "canny.b": dict(variant="dev-canny", mode="control", height=80, width=48, steps=3, guidance=10.0,
                    control="edges", control_hw=(100, 60), seed=52),
    "depth.a": dict(variant="dev-depth", mode="control", height=80, width=48, steps=2, guidance=10.0,
                    control="depth", control_hw=(80, 48), seed=53),
    "depth.b": dict(variant="dev-depth", mode="control", height=64, width=96, steps=3, guidance=3.5,
                    control="depth", control_hw=(64, 96), seed=54),
}

# (h, w) reference-image sizes whose Kontext auto-resize target is recorded (cheap: no denoising).
KONTEXT_SIZE_PROBES = [(40, 72), (1024, 1024), (768, 1360), (1360, 768), (480, 640), (640, 480), (100, 300),
                       (300, 100), (1000, 1001), (512, 512), (720, 1280), (833, 1247), (17, 19)]

# diffusers' pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS as (width, height) (copied so the tests need
# no torch; checked against diffusers whenever the references are computed).
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]

# Cases whose first transformer input is too large to store (the auto-resized Kontext reference).
NO_HIDDEN_STATES = {"kontext.auto"}


def max_sequence_length(variant: str) -> int:
    return 256 if variant == "schnell" else 512


class ReferenceCheckError(AssertionError):
    """A fixture failed to load cleanly, or the reference did not behave as expected."""


# --------------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _posterior_mean():
    """Every VAE encoding returns the posterior mean (see the module docstring)."""
    from diffusers.models.autoencoders import vae as vae_module

    dist = vae_module.DiagonalGaussianDistribution
    original = dist.sample
    dist.sample = lambda self, generator=None: self.mean
    try:
        yield
    finally:
        dist.sample = original


@contextlib.contextmanager
def _img2img_noise(noise_packed: np.ndarray, height: int, width: int):
    """FluxImg2ImgPipeline's randn_tensor returns our packed noise, unpacked to (1, 16, H/8, W/8)."""
    import torch
    from diffusers.pipelines.flux import pipeline_flux_img2img as module

    unpacked = module.FluxImg2ImgPipeline._unpack_latents(torch.from_numpy(noise_packed.copy()), height, width, 8)
    calls = []
    original = module.randn_tensor

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(unpacked.shape):
            raise ReferenceCheckError(f"img2img noise shape {tuple(shape)} != {tuple(unpacked.shape)}")
        calls.append(shape)
        return unpacked.clone().to(dtype=dtype)

    module.randn_tensor = fake
    try:
        yield calls
    finally:
        module.randn_tensor = original


def _record_transformer(transformer, store: dict):
    """Forward pre-hook keeping every call's timestep and the first call's hidden_states and img_ids."""

    def hook(module, args, kwargs):
        store.setdefault("timesteps", []).append(float(kwargs["timestep"].reshape(-1)[0]))
        if "hidden_states" not in store:
            store["hidden_states"] = kwargs["hidden_states"].detach().clone()
            store["img_ids"] = kwargs["img_ids"].detach().clone()
        return None

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

PIPELINES = {
    "schnell": "FluxImg2ImgPipeline",
    "dev": "FluxImg2ImgPipeline",
    "dev-kontext": "FluxKontextPipeline",
    "dev-fill": "FluxFillPipeline",
    "dev-canny": "FluxControlPipeline",
    "dev-depth": "FluxControlPipeline",
}


def load_pipeline(folder: Path, variant: str):
    """diffusers' pipeline for `variant`: the folder's model_index class (checked), components checked
    strictly by make_reference_outputs.load_and_check and handed over, so nothing is loaded twice."""
    import diffusers
    import torch

    from tests.reference.make_reference_outputs import load_and_check

    models = load_and_check(folder, variant)
    cls = getattr(diffusers, PIPELINES[variant])
    expected = tiny.PIPELINE_CLASS[variant]
    if variant not in ("schnell", "dev"):
        auto = diffusers.DiffusionPipeline.from_pretrained(
            folder, transformer=models["transformer"], vae=models["vae"], text_encoder=models["clip"],
            text_encoder_2=models["t5"],
        )
        if type(auto).__name__ != expected:
            raise ReferenceCheckError(f"{variant}: DiffusionPipeline loaded {type(auto).__name__}, not {expected}")
        del auto
    pipe = cls.from_pretrained(
        folder, transformer=models["transformer"], vae=models["vae"], text_encoder=models["clip"],
        text_encoder_2=models["t5"],
    )
    for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if component.dtype != torch.float32:
            raise ReferenceCheckError(f"{variant}: {type(component).__name__} is {component.dtype}")
    cfg = pipe.transformer.config
    if (cfg.in_channels, pipe.transformer.proj_out.out_features) != (tiny.TRANSFORMER_IN_CHANNELS[variant], 64):
        raise ReferenceCheckError(f"{variant}: transformer in/out {cfg.in_channels}/{cfg.out_channels}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------------------


def case_inputs(name: str) -> dict[str, np.ndarray]:
    """The generated inputs of a case (uint8 arrays), its noise and its settings, as stored in the npz."""
    c = CASES[name]
    seed, h, w = c["seed"], c["height"], c["width"]
    out: dict[str, np.ndarray] = {
        "variant": np.array(c["variant"]),
        "mode": np.array(c["mode"]),
        "prompt": np.array(PROMPTS[c["mode"]]),
        "height": np.array(h, np.int32),
        "width": np.array(w, np.int32),
        "steps": np.array(c["steps"], np.int32),
        "max_sequence_length": np.array(max_sequence_length(c["variant"]), np.int32),
        "guidance": np.array(c.get("guidance", 3.5), np.float32),
    }
    n = (h // 16) * (w // 16)
    out["noise"] = np.random.default_rng(seed).standard_normal((1, n, 64)).astype(np.float32)
    if c["mode"] == "img2img":
        out["image"] = make_photo(*c["image_hw"], seed=seed + 1000)
        out["image_strength"] = np.array(c["image_strength"], np.float32)
        out["diffusers_strength"] = np.array(1.0 - c["image_strength"], np.float32)
    elif c["mode"] == "kontext":
        out["image"] = make_photo(*c["image_hw"], seed=seed + 1000)
        out["auto_resize"] = np.array(c["auto_resize"])
    elif c["mode"] == "fill":
        if "outpaint" in c:
            unpadded = make_photo(*c["image_hw"], seed=seed + 1000)
            out["unpadded_image"] = unpadded
            out["outpaint"] = np.array(c["outpaint"], np.int32)
            out["image"], out["mask"] = pad_for_outpaint(unpadded, c["outpaint"])
            if out["image"].shape[:2] != (h, w):
                raise ReferenceCheckError(f"{name}: padded size {out['image'].shape[:2]} != {(h, w)}")
        else:
            out["image"] = make_photo(*c["image_hw"], seed=seed + 1000)
            out["mask"] = make_mask(*c.get("mask_hw", c["image_hw"]), c["mask"], seed=seed)
    elif c["mode"] == "control":
        make = make_edges if c["control"] == "edges" else make_depth
        out["control_image"] = make(*c["control_hw"], seed=seed + 1000)
    return out


def _pil(array: np.ndarray, folder: Path, stem: str):
    """Write `array` to PNG and read it back, as our pipeline reads image_path / mask_path."""
    from PIL import Image

    path = folder / f"{stem}.png"
    Image.fromarray(array).save(path)
    img = Image.open(path)
    img.load()
    return img


def run_case(pipe, name: str, inputs: dict[str, np.ndarray], tmp: Path, *, override: dict | None = None,
             record: bool = True) -> dict[str, np.ndarray]:
    """Run diffusers on one case; `override` replaces input arrays (to show the conditioning matters)."""
    import torch

    c = CASES[name]
    x = dict(inputs)
    if override:
        x.update(override)
    h, w, steps = c["height"], c["width"], c["steps"]
    common = dict(
        prompt=str(x["prompt"]),
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=float(x["guidance"]),
        max_sequence_length=int(x["max_sequence_length"]),
        output_type="np",
    )
    store: dict = {}
    handle = _record_transformer(pipe.transformer, store)
    noise = torch.from_numpy(x["noise"].copy())
    try:
        with _posterior_mean():
            if c["mode"] == "img2img":
                with _img2img_noise(x["noise"], h, w) as calls:
                    image = pipe(image=_pil(x["image"], tmp, "image"), strength=float(1.0 - c["image_strength"]),
                                 **common).images
                if len(calls) != 1:
                    raise ReferenceCheckError(f"{name}: randn_tensor called {len(calls)} times")
            elif c["mode"] == "kontext":
                image = pipe(image=_pil(x["image"], tmp, "image"), latents=noise, max_area=h * w,
                             _auto_resize=bool(c["auto_resize"]), **common).images
            elif c["mode"] == "fill":
                image = pipe(image=_pil(x["image"], tmp, "image"), mask_image=_pil(x["mask"], tmp, "mask"),
                             latents=noise, strength=1.0, **common).images
            else:
                image = pipe(control_image=_pil(x["control_image"], tmp, "control"), latents=noise,
                             **common).images
    finally:
        handle.remove()
    image = np.asarray(image, np.float32)[0]
    if image.shape != (h, w, 3):
        raise ReferenceCheckError(f"{name}: output {image.shape} != {(h, w, 3)}")
    out = {"output": (image * 255).round().astype(np.uint8)}
    if record:
        out["transformer_timesteps"] = np.array(store["timesteps"], np.float32)
        out["sigmas"] = pipe.scheduler.sigmas.detach().float().numpy().astype(np.float32)
        out["img_ids"] = store["img_ids"].float().numpy().astype(np.float32)
        if name not in NO_HIDDEN_STATES:
            out["hidden_states_0"] = store["hidden_states"].float().numpy().astype(np.float32)
        out["_hidden_shape"] = np.array(store["hidden_states"].shape, np.int32)
    return out


def kontext_size_table(pipe, tmp: Path) -> np.ndarray:
    """(in_h, in_w, out_h, out_w) of FluxKontextPipeline's auto-resize for KONTEXT_SIZE_PROBES, read off the
    image tensor handed to prepare_latents (the pipeline is stopped there)."""

    class _Stop(Exception):
        pass

    seen = []
    original = type(pipe).prepare_latents

    def capture(self, image, *args, **kwargs):
        seen.append(tuple(image.shape[-2:]))
        raise _Stop

    type(pipe).prepare_latents = capture
    rows = []
    try:
        for h, w in KONTEXT_SIZE_PROBES:
            img = _pil(np.full((h, w, 3), 128, np.uint8), tmp, "probe")
            try:
                pipe(prompt="a", image=img, height=64, width=64, max_area=64 * 64, num_inference_steps=1,
                     max_sequence_length=8, _auto_resize=True)
            except _Stop:
                pass
            rows.append((h, w, *seen[-1]))
    finally:
        type(pipe).prepare_latents = original
    return np.array(rows, np.int32)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# Alternative inputs that must change the output (so a parity test ignoring the conditioning would fail).
def _alternative(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = CASES[name]
    if c["mode"] in ("img2img", "kontext"):
        return {"image": make_photo(*inputs["image"].shape[:2], seed=c["seed"] + 5000)}
    if c["mode"] == "fill":
        return {"mask": 255 - inputs["mask"]}  # the mask inverted: the other region repainted
    return {"control_image": np.ascontiguousarray(inputs["control_image"][::-1, ::-1])}


MIN_CONDITIONING_EFFECT = 8  # uint8 levels: well above the 2/255 parity tolerance


def compute_conditioning_reference(workdir: Path) -> dict[str, np.ndarray]:
    import torch

    from tests.reference.make_reference_outputs import _quiet_libraries

    _quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _compute(Path(workdir))
    finally:
        torch.set_num_threads(threads)


def _compute(workdir: Path) -> dict[str, np.ndarray]:
    import diffusers
    import PIL
    import torch
    import transformers
    from diffusers.pipelines.flux import pipeline_flux_kontext

    if [tuple(r) for r in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS] != PREFERRED_KONTEXT_RESOLUTIONS:
        raise ReferenceCheckError("diffusers' PREFERRED_KONTEXT_RESOLUTIONS changed")
    tmp = workdir / "inputs"
    tmp.mkdir(parents=True, exist_ok=True)
    variants = sorted({c["variant"] for c in CASES.values()}, key=tiny.ALL_VARIANTS.index)
    ref: dict[str, np.ndarray] = {}
    for variant in variants:
        folder = tiny.write_tiny_flux(workdir / variant, variant, "float32", seed=0, bfl=True)
        pipe = load_pipeline(folder, variant)
        for name in [n for n, c in CASES.items() if c["variant"] == variant]:
            inputs = case_inputs(name)
            out = run_case(pipe, name, inputs, tmp)
            hidden_shape = out.pop("_hidden_shape")
            expect_c = tiny.TRANSFORMER_IN_CHANNELS[variant]
            if int(hidden_shape[-1]) != expect_c:
                raise ReferenceCheckError(f"{name}: transformer input has {hidden_shape[-1]} channels")
            alt = run_case(pipe, name, inputs, tmp, override=_alternative(name, inputs), record=False)
            effect = _max_diff(alt["output"], out["output"])
            print(f"{name}: conditioning effect {effect}/255", file=sys.stderr)
            if effect < MIN_CONDITIONING_EFFECT:
                raise ReferenceCheckError(f"{name}: changing the conditioning changed the output by {effect}")
            for k, v in {**inputs, **out}.items():
                ref[f"{name}.{k}"] = v
            ref[f"{name}.conditioning_effect"] = np.array(effect, np.int32)
        if variant == "dev-kontext":
            ref["kontext_sizes"] = kontext_size_table(pipe, tmp)
        del pipe
    ref["versions"] = np.array(
        [
            f"python {sys.version.split()[0]}",
            f"numpy {np.__version__}",
            f"torch {torch.__version__}",
            f"diffusers {diffusers.__version__}",
            f"transformers {transformers.__version__}",
            f"pillow {PIL.__version__}",
        ]
    )
    return ref


def main() -> None:
    from tests.reference.make_reference_outputs import write_reference

    write_reference(NPZ_PATH, compute_conditioning_reference, "flux1-tiny-cond-")


if __name__ == "__main__":
    main()
