"""The image-conditioned modes (issue #10) through the command lines, end to end on the tiny checkpoints:
`--seed` lists (one load, every image right), `-q 8`, `flux1-save` folders for every new alias, and
`flux1-compare` with input images, control images and masks. The modes, input files and LoRA writers are
those of tests/pipeline/test_conditioning_modes.py."""

import hashlib
import json

import numpy as np
import pytest

from flux_1 import Flux1
from flux_1.cli import compare as compare_cli
from flux_1.cli import main as generate_cli
from flux_1.cli import save as save_cli
from flux_1.pipeline import flux1
from flux_1.pipeline.metadata import read_png_metadata
from tests.cli.common import pixels, run_main, write_lora
from tests.pipeline.test_conditioning_modes import (
    ALIASES,
    IN_CHANNELS,
    METADATA_MODE,
    MODES,
    PROMPT,
    SIZE,
    config_for,
    write_fal_lora,
    write_inputs,
)

# mode -> its flags ({image}, {mask}, {control}: the input files), as MODES' Config fields
FLAGS = {
    "img2img": ["--image-path", "{image}", "--image-strength", "0.5", "--steps", "4"],
    "kontext": ["--image-path", "{image}", "--no-auto-resize"],
    "fill": ["--image-path", "{image}", "--mask-path", "{mask}"],
    "outpaint": ["--image-path", "{image}", "--outpaint", "16,0,0,16"],
    "canny": ["--control-image-path", "{control}"],
    "depth": ["--control-image-path", "{control}"],
}
INPUT_KEYS = {"image": "image", "mask": "mask", "control_image": "control"}


@pytest.fixture(scope="module")
def ckpt(tiny_flux):
    """Built before capsys captures stderr (the tokenizer trainer needs the real one)."""
    return {alias: tiny_flux(alias) for alias in ALIASES}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(ckpt, files):
    """(mode, seed, quantize) -> the Python API's image pixels (one Flux1 per mode and quantization)."""
    models, cache = {}, {}

    def get(mode, seed, quantize=None):
        if (mode, seed, quantize) not in cache:
            alias, _ = MODES[mode]
            if (mode, quantize) not in models:
                models[mode, quantize] = Flux1.from_alias(alias, path=ckpt[alias], precision="float32",
                                                          quantize=quantize, progress=False)
            image = models[mode, quantize].generate_image(seed, PROMPT, config_for(mode, files), progress=False)
            cache[mode, seed, quantize] = np.asarray(image.image)
        return cache[mode, seed, quantize]

    return get


def mode_flags(mode, files) -> list[str]:
    return [f.format(**files) for f in FLAGS[mode]]


def common(root, alias, *extra) -> list[str]:
    return ["--model", alias, "--path", str(root), "--prompt", PROMPT, "--steps", "2", "--precision", "float32",
            *map(str, extra)]


def check_inputs_recorded(info: dict, mode: str, files: dict) -> None:
    assert info["mode"] == METADATA_MODE[mode]
    assert info["inputs"], info
    for key, record in info["inputs"].items():
        path = files[INPUT_KEYS[key]]
        assert record == {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture
def count_encodes(monkeypatch):
    """A list that gets one entry per VAE encoding of an input image."""
    calls = []
    original = flux1.Flux1.encode_image

    def counting(self, pixels):
        calls.append(tuple(pixels.shape))
        return original(self, pixels)

    monkeypatch.setattr(flux1.Flux1, "encode_image", counting)
    return calls


# -- --seed lists -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_seed_list_one_load_every_image_right(mode, ckpt, files, reference, tmp_path, capsys, count_loads,
                                              count_encodes):
    alias, _ = MODES[mode]
    out = tmp_path / f"{mode}.png"
    code, stdout, stderr = run_main(generate_cli.main, common(ckpt[alias], alias, "--seed", 1, 2, "--output", out,
                                                              *mode_flags(mode, files)), capsys)
    assert code == 0, stderr
    assert len(count_loads) == 1
    # Each input is encoded once for all seeds (the img2img start, the Kontext reference, Fill's masked
    # image or the control image), and the images are the same as from separate runs.
    assert len(count_encodes) == 1
    written = [tmp_path / f"{mode}_seed_{s}.png" for s in (1, 2)]
    assert sorted(tmp_path.glob("*.png")) == written
    for seed, path in zip((1, 2), written, strict=True):
        assert f"Saved {path}" in stdout
        info = read_png_metadata(path)["flux_1"]
        assert info["seed"] == seed and (info["width"], info["height"]) == SIZE[mode]
        check_inputs_recorded(info, mode, files)
        np.testing.assert_array_equal(pixels(path), reference(mode, seed))
    assert not np.array_equal(pixels(written[0]), pixels(written[1]))


# -- -q ----------------------------------------------------------------------------------------------------


def test_quantized_fill_from_the_command_line(ckpt, files, reference, tmp_path, capsys):
    out = tmp_path / "q8.png"
    code, _, stderr = run_main(generate_cli.main, common(ckpt["dev-fill"], "dev-fill", "-q", 8, "--seed", 1,
                                                         "--output", out, *mode_flags("fill", files)), capsys)
    assert code == 0, stderr
    meta = read_png_metadata(out)
    assert meta["flux_1"]["quantization"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert "Quantization: 8-bit" in meta["parameters"] and "Denoising strength: 1," in meta["parameters"]
    check_inputs_recorded(meta["flux_1"], "fill", files)
    np.testing.assert_array_equal(pixels(out), reference("fill", 1, 8))
    assert np.abs(pixels(out).astype(int) - reference("fill", 1)).mean() < 1.0


# -- flux1-save ---------------------------------------------------------------------------------------------


SAVED_MODE = {"dev-kontext": "kontext", "dev-fill": "outpaint", "dev-canny": "canny", "dev-depth": "depth"}


@pytest.mark.parametrize("alias", SAVED_MODE)
def test_flux1_save_q8_folder_equals_runtime_q8(alias, ckpt, files, reference, tmp_path, capsys):
    mode = SAVED_MODE[alias]
    folder = tmp_path / f"{alias}-q8"
    code, stdout, stderr = run_main(save_cli.main, ["--model", alias, "--source", str(ckpt[alias]), "--path",
                                                    str(folder), "-q", "8", "--precision", "float32"], capsys)
    assert code == 0, stderr
    assert f"Saved {alias} to {folder}" in stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == alias and manifest["quantization"]["bits"] == 8

    out = tmp_path / "img.png"  # no -q: the folder's quantization is used
    code, _, stderr = run_main(generate_cli.main, common(folder, alias, "--seed", 1, "--output", out,
                                                         *mode_flags(mode, files)), capsys)
    assert code == 0, stderr
    info = read_png_metadata(out)["flux_1"]
    assert info["quantization"]["bits"] == 8 and info["model"] == alias
    check_inputs_recorded(info, mode, files)
    np.testing.assert_array_equal(pixels(out), reference(mode, 1, 8))


# -- flux1-compare ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"peft": write_lora(folder / "style.safetensors", seed=7),
            "dev-kontext": write_fal_lora(folder / "fal_kontext.safetensors", IN_CHANNELS["dev-kontext"]),
            "dev-fill": write_fal_lora(folder / "fal_fill.safetensors", IN_CHANNELS["dev-fill"], seed=4)}


@pytest.mark.parametrize("mode, which, quantize", [("kontext", ["peft", "dev-kontext"], None),
                                                   ("kontext", ["dev-kontext"], 8), ("canny", ["peft"], None),
                                                   ("fill", ["dev-fill"], None)])
def test_compare_with_input_images(mode, which, quantize, ckpt, files, loras, reference, tmp_path, capsys,
                                   count_loads):
    alias, _ = MODES[mode]
    out = tmp_path / "cmp"
    argv = common(ckpt[alias], alias, "--seed", 1, "--output-dir", out, "--strengths", 0, 1,
                  "--lora-paths", *(loras[w] for w in which), *mode_flags(mode, files),
                  *(["-q", quantize] if quantize else []))
    code, stdout, stderr = run_main(compare_cli.main, argv, capsys)
    assert code == 0, stderr
    assert len(count_loads) == 1
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "strength_0.png", "strength_1.png"]
    # strength 0 is, pixel for pixel, the model without the LoRAs; strength 1 is not
    np.testing.assert_array_equal(pixels(out / "strength_0.png"), reference(mode, 1, quantize))
    assert np.abs(pixels(out / "strength_1.png").astype(int) - reference(mode, 1, quantize)).mean() > 1.0
    for name in ("strength_0.png", "strength_1.png", "grid.png"):
        info = read_png_metadata(out / name)["flux_1"]
        check_inputs_recorded(info, mode, files)
        assert len(info["loras"]) == len(which)
        assert info["quantization"] == ({"bits": 8, "group_size": 64, "mode": "affine"} if quantize else None)
    grid = read_png_metadata(out / "grid.png")["flux_1"]
    assert grid["comparison"]["images"] == ["strength_0.png", "strength_1.png"]
    assert pixels(out / "grid.png").shape[1] == 2 * SIZE[mode][0]
