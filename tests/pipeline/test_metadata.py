"""Image metadata (A1111 `parameters` + JSON chunk + sidecar) and safe PNG writing; no model needed."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_1 import Config, GeneratedImage, __version__
from flux_1.pipeline import metadata


def make_image(model="schnell", seed=42, prompt="a red fox in the snow", steps=4, width=48, height=32,
               guidance=3.5, quantization=None, loras=None) -> GeneratedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return GeneratedImage(
        image=Image.fromarray(pixels), seed=seed, prompt=prompt,
        config=Config(steps, height, width, guidance), model=model, precision="float32",
        quantization=quantization, loras=loras or [],
        timings={"text_encoding": 0.1, "denoising": 1.0, "decoding": 0.2},
    )


def test_a1111_text_schnell_is_exact():
    image = make_image(width=1024, height=1024)
    assert metadata.a1111_parameters(image.metadata()) == (
        "a red fox in the snow\n"
        f"Steps: 4, Sampler: Euler, CFG scale: 1, Seed: 42, Size: 1024x1024, Model: flux1-schnell, "
        f"Version: flux_1 {__version__}"
    )


def test_a1111_text_dev_with_guidance_quantization_and_loras():
    image = make_image(
        model="dev", steps=25, width=768, height=512, guidance=2.5,
        quantization={"bits": 8, "group_size": 64, "mode": "affine"},
        loras=[{"path": "/loras/fox_style.safetensors", "scale": 0.8}, {"name": "ink, wash", "scale": 1.0}],
    )
    assert metadata.a1111_parameters(image.metadata()) == (
        "a red fox in the snow\n"
        "Steps: 25, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 42, Size: 768x512, "
        'Model: flux1-dev, Quantization: 8-bit, LoRAs: "fox_style: 0.8, ink, wash: 1", '
        f"Version: flux_1 {__version__}"
    )


def test_microscaling_quantization_is_named_by_mode():
    image = make_image(quantization={"bits": 4, "group_size": 32, "mode": "mxfp4"})
    assert "Quantization: mxfp4," in metadata.a1111_parameters(image.metadata())


def test_json_metadata_fields():
    image = make_image(model="dev", loras=[{"path": Path("/l/a.safetensors"), "scale": 0.5}])
    meta = image.metadata()
    assert meta["model"] == "dev" and meta["seed"] == 42 and meta["steps"] == 4
    assert (meta["width"], meta["height"], meta["guidance"]) == (48, 32, 3.5)
    assert meta["precision"] == "float32" and meta["quantization"] is None
    assert meta["loras"] == [{"path": "/l/a.safetensors", "name": "a", "scale": 0.5}]
    assert meta["version"] == __version__
    json.dumps(meta)  # serialisable
    assert make_image(model="schnell").metadata()["guidance"] is None  # schnell ignores guidance


def test_save_round_trip_with_non_ascii_prompt_and_sidecar(tmp_path):
    prompt = "Café au lait, 東京の夜 🦊\nsecond line"
    image = make_image(prompt=prompt)
    path = image.save(tmp_path / "a" / "b" / "img.png", sidecar=True)  # parent folders are created
    assert path == tmp_path / "a" / "b" / "img.png"
    read = metadata.read_png_metadata(path)
    assert read["parameters"].startswith(prompt + "\nSteps: 4, Sampler: Euler")
    assert read["flux_1"] == image.metadata()
    assert read["flux_1"]["prompt"] == prompt
    assert json.loads(path.with_suffix(".json").read_text(encoding="utf-8")) == read["flux_1"]
    with Image.open(path) as im:
        assert im.size == (48, 32)
        np.testing.assert_array_equal(np.asarray(im), np.asarray(image.image))


def test_never_overwrites_unless_asked(tmp_path):
    target = tmp_path / "img.png"
    first, second, third = (make_image(seed=s).save(target) for s in (1, 2, 3))
    assert [p.name for p in (first, second, third)] == ["img.png", "img_1.png", "img_2.png"]
    assert metadata.read_png_metadata(first)["flux_1"]["seed"] == 1
    assert metadata.read_png_metadata(third)["flux_1"]["seed"] == 3
    assert make_image(seed=4).save(target, overwrite=True) == target
    assert metadata.read_png_metadata(target)["flux_1"]["seed"] == 4


def test_a_taken_sidecar_name_moves_the_image_too(tmp_path):
    (tmp_path / "img.json").write_text("{}")
    path = make_image().save(tmp_path / "img.png", sidecar=True)
    assert path.name == "img_1.png" and (tmp_path / "img_1.json").exists()
    assert (tmp_path / "img.json").read_text() == "{}"


def test_only_png(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        make_image().save(tmp_path / "img.jpg")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_image().save(tmp_path / "img.png", sidecar=True)
    assert list(tmp_path.iterdir()) == []  # neither the image, the sidecar nor a temp file


def test_file_permissions_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = make_image().save(tmp_path / "img.png")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_nan_never_reaches_the_json_and_nothing_is_written(tmp_path):
    image = make_image(loras=[{"name": "broken", "scale": float("nan")}])
    with pytest.raises(ValueError, match="non-finite number"):
        image.save(tmp_path / "out.png", sidecar=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["sidecar write", "sidecar publish"])
def test_full_disk_on_the_sidecar_leaves_neither_file(tmp_path, monkeypatch, stage):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if stage == "sidecar write":
        original = Path.write_bytes
        monkeypatch.setattr(Path, "write_bytes",
                            lambda self, data: full() if self.name.startswith(".out.json") else original(self, data))
    else:
        original_claim = metadata._claim
        monkeypatch.setattr(metadata, "_claim",
                            lambda tmp, target: full() if target.suffix == ".json" else original_claim(tmp, target))
    with pytest.raises(OSError, match="No space left"):
        make_image().save(tmp_path / "out.png", sidecar=True)
    assert list(tmp_path.iterdir()) == []


def test_png_and_sidecar_take_the_same_free_number(tmp_path):
    (tmp_path / "out.json").write_text("{}")  # a stray sidecar: out.png must not pair with it
    path = make_image().save(tmp_path / "out.png", sidecar=True)
    assert path.name == "out_1.png" and (tmp_path / "out_1.json").exists()
    assert json.loads((tmp_path / "out_1.json").read_text())["seed"] == 42
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
