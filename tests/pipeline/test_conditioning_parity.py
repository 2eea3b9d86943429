"""Image-conditioned generation (issue #10) at parity with diffusers, float32, on the tiny checkpoints.

The committed references (tests/reference/conditioning_outputs.npz) were made by
tests/reference/make_conditioning_references.py: FluxImg2ImgPipeline (schnell, dev), FluxKontextPipeline,
FluxFillPipeline and FluxControlPipeline (Canny, Depth) on the same fixture weights, every VAE encoding
patched to the posterior mean, the same packed initial noise (`{case}.noise`). Each case writes its stored
input image / mask / control map to PNG, runs our pipeline with `latents=` that noise and asserts every
pixel within 2/255 of diffusers. With torch + diffusers installed the references are also recomputed live.

Every case's conditioning changes diffusers' output by far more than the tolerance
(`{case}.conditioning_effect`, checked when the references are made), so ignoring it fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import has_torch_references
from tests.reference.make_conditioning_references import CASES, KONTEXT_SIZE_PROBES, NPZ_PATH

TOL = 2  # uint8 levels (2/255)

needs_torch = pytest.mark.skipif(not has_torch_references(), reason="torch / diffusers not installed")


@pytest.fixture(scope="module")
def cref() -> dict[str, np.ndarray]:
    if not NPZ_PATH.exists():
        pytest.fail(f"{NPZ_PATH} is missing: run python tests/reference/make_conditioning_references.py")
    with np.load(NPZ_PATH) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def conditioned(tiny_flux):
    """Flux1 per alias, loaded once per module from the tiny fixture folders."""
    from flux_1 import Flux1

    cache: dict = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = Flux1.from_alias(alias, path=tiny_flux(alias), precision="float32")
        return cache[alias]

    return get


def _png(array: np.ndarray, path: Path) -> str:
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def _config_kwargs(cref, name: str, tmp_path: Path) -> dict:
    """Config(...) arguments of a case: the stored inputs written to PNG files."""
    key = name
    mode = str(cref[f"{key}.mode"])
    kw = dict(
        num_inference_steps=int(cref[f"{key}.steps"]),
        height=int(cref[f"{key}.height"]),
        width=int(cref[f"{key}.width"]),
        guidance=float(cref[f"{key}.guidance"]),
    )
    if mode == "img2img":
        kw.update(image_path=_png(cref[f"{key}.image"], tmp_path / "image.png"),
                  image_strength=float(cref[f"{key}.image_strength"]))
    elif mode == "kontext":
        kw.update(image_path=_png(cref[f"{key}.image"], tmp_path / "image.png"),
                  auto_resize=bool(cref[f"{key}.auto_resize"]))
    elif mode == "fill":
        kw.update(image_path=_png(cref[f"{key}.image"], tmp_path / "image.png"),
                  mask_path=_png(cref[f"{key}.mask"], tmp_path / "mask.png"))
    elif mode == "control":
        kw.update(control_image_path=_png(cref[f"{key}.control_image"], tmp_path / "control.png"))
    else:
        raise AssertionError(mode)
    return kw


def _generate(conditioned, cref, name: str, config_kwargs: dict) -> np.ndarray:
    from flux_1 import Config

    flux = conditioned(str(cref[f"{name}.variant"]))
    image = flux.generate_image(seed=0, prompt=str(cref[f"{name}.prompt"]), config=Config(**config_kwargs),
                                latents=cref[f"{name}.noise"], progress=False)
    return np.asarray(image.image.convert("RGB"))


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= TOL, (
        f"{what}: max pixel difference {diff.max()}/255 > {TOL}/255 "
        f"(mean {diff.mean():.3f}, {(diff > TOL).sum()} pixels over)"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_diffusers(conditioned, cref, tmp_path, name):
    """img2img / Kontext / Fill (inpaint, explicitly padded outpaint) / Canny / Depth: within 2/255."""
    ours = _generate(conditioned, cref, name, _config_kwargs(cref, name, tmp_path))
    _assert_close(ours, cref[f"{name}.output"], name)


def test_outpaint_option_equals_the_explicitly_padded_inputs(conditioned, cref, tmp_path):
    """Config(outpaint=(top, right, bottom, left)) pads the image and masks exactly the padding.

    The canvas colour is irrelevant to diffusers' Fill at strength 1 (the masked image is image * (1 - mask),
    and the initial latents are the given noise), so any pad fill must give the reference image."""
    name = "fill.outpaint"
    kw = _config_kwargs(cref, name, tmp_path)
    kw.pop("mask_path")
    kw["image_path"] = _png(cref[f"{name}.unpadded_image"], tmp_path / "unpadded.png")
    kw["outpaint"] = tuple(int(v) for v in cref[f"{name}.outpaint"])
    ours = _generate(conditioned, cref, name, kw)
    _assert_close(ours, cref[f"{name}.output"], f"{name} via outpaint=")


def test_img2img_output_size_defaults_to_the_image(conditioned, cref, tmp_path):
    """No height/width: the output is the input image's size rounded down to multiples of 16 (70x101 ->
    64x96; the image is resized to it with PIL Lanczos, as diffusers does when given that size)."""
    name = "img2img.schnell.b"
    assert cref[f"{name}.image"].shape[:2] == (70, 101)
    kw = _config_kwargs(cref, name, tmp_path)
    del kw["height"], kw["width"]
    ours = _generate(conditioned, cref, name, kw)
    _assert_close(ours, cref[f"{name}.output"], f"{name} at the default size")


def kontext_auto_size(h: int, w: int) -> tuple[int, int]:
    """diffusers' FluxKontextPipeline auto-resize target (height, width) for an h x w reference image
    (pipeline_flux_kontext.py, "3. Preprocess image"): the size is first rounded down to multiples of 16,
    its aspect w/h is matched to PREFERRED_KONTEXT_RESOLUTIONS by min((|aspect - W/H|, W, H)) (ties: the
    smaller W), and the image is then resized to that W x H with PIL Lanczos."""
    from tests.reference.make_conditioning_references import PREFERRED_KONTEXT_RESOLUTIONS

    h, w = h // 16 * 16, w // 16 * 16
    _, ww, hh = min((abs(w / h - rw / rh), rw, rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
    return hh // 16 * 16, ww // 16 * 16


def test_kontext_auto_resize_sizes(cref):
    """The rule above reproduces every size diffusers chose (the table is recorded from diffusers)."""
    table = cref["kontext_sizes"]
    assert [tuple(r[:2]) for r in table] == [tuple(p) for p in KONTEXT_SIZE_PROBES]
    for in_h, in_w, out_h, out_w in table:
        assert kontext_auto_size(int(in_h), int(in_w)) == (out_h, out_w), (in_h, in_w)


def test_reference_npz_is_small_and_well_formed(cref):
    assert NPZ_PATH.stat().st_size < 1_000_000
    for name in CASES:
        h, w = int(cref[f"{name}.height"]), int(cref[f"{name}.width"])
        assert h != w and h % 16 == 0 and w % 16 == 0, name
        assert cref[f"{name}.noise"].shape == (1, (h // 16) * (w // 16), 64), name
        assert cref[f"{name}.output"].shape == (h, w, 3) and cref[f"{name}.output"].dtype == np.uint8, name
        assert int(cref[f"{name}.conditioning_effect"]) >= 4 * TOL, name
    for k, v in cref.items():
        if v.dtype.kind == "f":
            assert v.dtype == np.float32 and np.isfinite(v).all(), k
    by_mode: dict[str, set] = {}
    for c in CASES.values():
        by_mode.setdefault(c["variant"] + "/" + c["mode"], set()).add((c["steps"], c.get("image_strength"),
                                                                       c.get("guidance")))
    assert all(len(v) >= 2 for v in by_mode.values()), by_mode  # two settings per variant and mode


@needs_torch
def test_committed_conditioning_reference_matches_fresh_computation(tmp_path, cref):
    from tests.reference.make_conditioning_references import compute_conditioning_reference
    from tests.reference.make_reference_outputs import compare_references

    start = time.perf_counter()
    fresh = compute_conditioning_reference(tmp_path)
    problems = compare_references(fresh, cref, rtol=1e-5)
    assert not problems, (
        "conditioning reference drift (rerun tests/reference/make_conditioning_references.py?):\n"
        + "\n".join(problems)
    )
    assert time.perf_counter() - start < 300
