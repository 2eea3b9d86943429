"""A control LoRA on plain dev gives diffusers' image (issue #10), float32, on the tiny dev checkpoint.

The committed reference (tests/reference/control_lora_outputs.npz) was made by
tests/reference/make_control_lora_reference.py: ``FluxControlPipeline.from_pretrained(dev folder)``,
``load_lora_weights`` of a BFL-format control LoRA (every key of FLUX.1-{Canny,Depth}-dev-lora, img_in
taking 128 inputs, lora_B biases, QK norm ``scale`` weights), ``set_adapters`` to the case's LoRA scale, the
control image's VAE posterior patched to its mean, and the packed noise ``{case}.noise`` as ``latents=``.
Here the same LoRA file is written by the same code (``control_lora_file``), loaded by
``Flux1.from_alias("dev", lora_paths=..., lora_scales=...)`` (img_in widened 64 -> 128, so plain dev runs
in control mode) and every pixel must be within 2/255 of diffusers'. Non-zero scales only: diffusers loads
the file's norms at any scale, ours puts the model's own back at strength 0 (see the reference script).

That the comparison means something: the control map and the LoRA scale each change diffusers' output by
more than 8/255 (``{case}.control_effect`` / ``.lora_effect``, checked when the reference is made, and here
for our own image), and without the LoRA both diffusers and we refuse the control image. With torch,
diffusers and peft installed the reference is also recomputed live.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import has_torch_references
from tests.reference import make_control_lora_reference as ref_script
from tests.reference.make_control_lora_reference import CASES, LORA_SEED, MIN_EFFECT, NPZ_PATH

TOL = 2  # uint8 levels (2/255)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:
        return False
    return has_torch_references()


needs_diffusers_peft = pytest.mark.skipif(not _has_peft(), reason="torch / diffusers / peft not installed")


@pytest.fixture(scope="module")
def lref() -> dict[str, np.ndarray]:
    if not NPZ_PATH.exists():
        pytest.fail(f"{NPZ_PATH} is missing: run python tests/reference/make_control_lora_reference.py")
    with np.load(NPZ_PATH) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory) -> Path:
    return ref_script.write_control_lora(tmp_path_factory.mktemp("control-lora"), seed=LORA_SEED)


def _png(array: np.ndarray, path: Path) -> str:
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


def _generate(flux, lref, name: str, tmp_path: Path, control: np.ndarray | None = None) -> np.ndarray:
    from flux_1 import Config

    control = lref[f"{name}.control_image"] if control is None else control
    config = Config(
        control_image_path=_png(control, tmp_path / f"{name}-control.png"),
        num_inference_steps=int(lref[f"{name}.steps"]), height=int(lref[f"{name}.height"]),
        width=int(lref[f"{name}.width"]), guidance=float(lref[f"{name}.guidance"]),
    )  # fmt: skip
    image = flux.generate_image(
        seed=0, prompt=str(lref[f"{name}.prompt"]), config=config, latents=lref[f"{name}.noise"], progress=False
    )
    return np.asarray(image.image.convert("RGB"))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> int:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    print(f"\n{what}: max pixel difference {diff.max()}/255 (mean {diff.mean():.3f})")
    assert diff.max() <= TOL, (
        f"{what}: max pixel difference {diff.max()}/255 > {TOL}/255 "
        f"(mean {diff.mean():.3f}, {(diff > TOL).sum()} pixels over)"
    )
    return int(diff.max())


def _flux(tiny_dev, lora_path, scale: float):
    from flux_1 import Flux1

    return Flux1.from_alias(
        "dev", path=tiny_dev, lora_paths=[str(lora_path)], lora_scales=[scale], precision="float32", progress=False
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_control_lora_on_dev_matches_diffusers(tiny_dev, lora_path, lref, tmp_path, name):
    """Plain dev + the control LoRA at the case's scale: diffusers' image within 2/255; and a flipped
    control map moves our image away from it by more than 8/255 (the control latents are used)."""
    flux = _flux(tiny_dev, lora_path, float(lref[f"{name}.lora_scale"]))
    ours = _generate(flux, lref, name, tmp_path)
    assert flux.transformer.params.in_channels == int(lref[f"{name}.transformer_in"]) == 128
    _assert_close(ours, lref[f"{name}.output"], f"{name} (LoRA scale {float(lref[f'{name}.lora_scale']):g})")
    flipped = np.ascontiguousarray(lref[f"{name}.control_image"][::-1, ::-1])
    moved = _max_diff(_generate(flux, lref, name, tmp_path, control=flipped), lref[f"{name}.output"])
    assert moved > MIN_EFFECT, f"{name}: another control map changed our image by only {moved}/255"


def test_retuned_scale_matches_diffusers(tiny_dev, lora_path, lref, tmp_path):
    """Loaded at another scale, then set_lora_scales to the case's (merged weights re-merged, norms kept)."""
    name = min(CASES, key=lambda n: CASES[n]["lora_scale"])  # the scale below 1
    flux = _flux(tiny_dev, lora_path, 1.0)
    _generate(flux, lref, name, tmp_path)  # the transformer loaded and merged at 1.0
    flux.set_lora_scales([float(lref[f"{name}.lora_scale"])])
    _assert_close(_generate(flux, lref, name, tmp_path), lref[f"{name}.output"], f"{name} after set_lora_scales")


def test_control_image_without_the_lora_is_refused(tiny_dev, lref, tmp_path):
    """Plain dev (64 inputs) has no room for control latents: diffusers fails (recorded), we refuse."""
    from flux_1 import Config, Flux1

    assert str(lref["no_lora_error"])  # what diffusers raised
    name = sorted(CASES)[0]
    flux = Flux1.from_alias("dev", path=tiny_dev, precision="float32", progress=False)
    config = Config(
        control_image_path=_png(lref[f"{name}.control_image"], tmp_path / "control.png"),
        num_inference_steps=1,
        height=int(lref[f"{name}.height"]),
        width=int(lref[f"{name}.width"]),
    )
    with pytest.raises(ValueError, match="control"):
        flux.generate_image(seed=0, prompt="a", config=config, latents=lref[f"{name}.noise"], progress=False)


def test_reference_is_small_well_formed_and_meaningful(lref):
    assert NPZ_PATH.stat().st_size < 200_000
    assert int(lref["lora_seed"]) == LORA_SEED
    scales, steps = set(), set()
    for name in CASES:
        h, w = int(lref[f"{name}.height"]), int(lref[f"{name}.width"])
        assert h != w and h % 16 == 0 and w % 16 == 0, name
        assert lref[f"{name}.noise"].shape == (1, (h // 16) * (w // 16), 64), name
        assert lref[f"{name}.output"].shape == (h, w, 3) and lref[f"{name}.output"].dtype == np.uint8, name
        assert int(lref[f"{name}.control_effect"]) > MIN_EFFECT, name
        assert int(lref[f"{name}.lora_effect"]) > MIN_EFFECT, name
        assert int(lref[f"{name}.fused_max_diff"]) <= 1, name
        assert float(lref[f"{name}.lora_scale"]) > 0, name
        scales.add(float(lref[f"{name}.lora_scale"]))
        steps.add(int(lref[f"{name}.steps"]))
    assert len(scales) >= 2 and len(steps) >= 2


def test_lora_file_is_the_reference_one_and_in_the_bfl_control_layout(lref):
    """The file written here holds exactly the tensors diffusers loaded for the committed reference."""
    a = ref_script.control_lora_file(LORA_SEED)
    assert ref_script.lora_digest(a) == str(lref["lora_digest"]), "control_lora_file changed: rerun the script"
    assert a["img_in.lora_A.weight"].shape[1] == 128 and "img_in.lora_B.bias" in a
    assert sum(k.endswith(".scale") for k in a) == 4 * 2 + 2 * 2  # QK norms: 2 double (img, txt), 2 single
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())


@needs_diffusers_peft
def test_committed_reference_matches_fresh_computation(tmp_path, lref):
    from tests.reference.make_control_lora_reference import compute_control_lora_reference
    from tests.reference.make_reference_outputs import compare_references

    start = time.perf_counter()
    fresh = compute_control_lora_reference(tmp_path)
    problems = compare_references(fresh, lref, rtol=1e-5)
    assert not problems, (
        "control LoRA reference drift (rerun tests/reference/make_control_lora_reference.py?):\n" + "\n".join(problems)
    )
    assert time.perf_counter() - start < 120
