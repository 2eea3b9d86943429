"""Every image-conditioned mode (issue #10) end to end on the tiny checkpoints, through the Python API:
quantized (-q 8, -q 4) against float32, saved folders against their source, several LoRAs at once (one in
fal's Kontext trainer format), and the PNG metadata of each mode.

Modes: img2img on dev, Kontext, Fill with a mask, Fill outpainting, Canny, Depth; all at 64x48 (outpaint
80x64), seed 1, float32 compute, 2 denoising steps (img2img: 4 steps, half skipped). The CLI side (flux1-save,
flux1-compare, --seed lists) is tests/cli/test_conditioning_workflows.py, which imports the helpers here.
"""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from flux_1 import Config, Flux1
from flux_1.pipeline.metadata import read_png_metadata
from flux_1.pipeline.save_model import save_model
from tests.cli.common import write_lora

PROMPT = "make it winter"
SEED = 1
W, H = 64, 48
HIDDEN, MLP = 64, 256  # the tiny transformer (tests/fixtures/make_tiny_checkpoints.py)
IN_CHANNELS = {"dev": 64, "dev-kontext": 64, "dev-fill": 384, "dev-canny": 128, "dev-depth": 128}

# mode -> (alias, Config fields; "{image}", "{mask}", "{control}" are the input files)
MODES = {
    "img2img": ("dev", dict(image_path="{image}", image_strength=0.5, num_inference_steps=4)),
    "kontext": ("dev-kontext", dict(image_path="{image}", auto_resize=False)),
    "fill": ("dev-fill", dict(image_path="{image}", mask_path="{mask}")),
    "outpaint": ("dev-fill", dict(image_path="{image}", outpaint=(16, 0, 0, 16))),
    "canny": ("dev-canny", dict(control_image_path="{control}")),
    "depth": ("dev-depth", dict(control_image_path="{control}")),
}
METADATA_MODE = {"img2img": "img2img", "kontext": "kontext", "fill": "fill", "outpaint": "fill",
                 "canny": "control", "depth": "control"}
SIZE = {mode: (80, 64) if mode == "outpaint" else (W, H) for mode in MODES}
ALIASES = sorted({alias for alias, _ in MODES.values()})
# Mean |pixel difference| (levels of 255) to float32 allowed per quantization. Measured on these tiny
# models (2 steps): 8-bit 0.14-0.29 (max 3 levels), 4-bit 2.5-4.3 (max 28 levels); README's text-to-image
# table says 8-bit 0.14, 4-bit 1.8. The bounds leave ~3x room for other BLAS / mlx builds.
MEAN_BOUND = {8: 1.0, 4: 12.0}
MAX_BOUND = {8: 12, 4: 80}


def write_inputs(folder):
    """in.png (a textured gradient), mask.png (white rectangle: repaint), control.png (an edge map),
    all 64x48. Returns {"image": path, "mask": path, "control": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1) + rng.integers(-20, 20, (H, W, 3))
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / "in.png")
    mask = np.zeros((H, W), np.uint8)
    mask[8:32, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    edges = np.zeros((H, W), np.uint8)
    edges[12, 8:56] = edges[36, 8:56] = edges[12:37, 8] = edges[12:37, 55] = 255
    edges[np.arange(H), np.arange(H) + 8] = 255
    Image.fromarray(edges).convert("RGB").save(folder / "control.png")
    return {"image": folder / "in.png", "mask": folder / "mask.png", "control": folder / "control.png"}


def config_for(mode: str, files: dict, **overrides) -> Config:
    _, fields = MODES[mode]
    fields = {k: str(v).format(**files) if isinstance(v, str) else v for k, v in fields.items()}
    return Config(**{"num_inference_steps": 2, **fields, **overrides})


def write_fal_lora(path, in_channels: int, seed: int = 3, rank: int = 4, std: float = 0.3):
    """A LoRA in fal's Kontext trainer format: PEFT `lora_A`/`lora_B` under `base_model.model.` + BFL names
    (fused qkv and linear1, img_in, the final layer)."""
    rng = np.random.default_rng(seed)
    tensors = {}

    def pair(stem, out, inp):
        tensors[f"base_model.model.{stem}.lora_A.weight"] = (std * rng.standard_normal((rank, inp))).astype(np.float32)
        tensors[f"base_model.model.{stem}.lora_B.weight"] = (std * rng.standard_normal((out, rank))).astype(np.float32)

    pair("double_blocks.0.img_attn.qkv", 3 * HIDDEN, HIDDEN)
    pair("double_blocks.1.txt_mlp.0", MLP, HIDDEN)
    pair("single_blocks.0.linear1", 3 * HIDDEN + MLP, HIDDEN)
    pair("single_blocks.1.linear2", HIDDEN, HIDDEN + MLP)
    pair("img_in", HIDDEN, in_channels)
    save_file(tensors, str(path))
    return path


def fal_as_diffusers(fal_path, path):
    """The same deltas as `write_fal_lora`'s qkv and linear1 pairs, in diffusers/PEFT names with the fused
    B split by rows (q, k, v, mlp): a LoRA that must give the same image."""
    from safetensors.numpy import load_file

    fal = load_file(str(fal_path))
    out = {}

    def split(bfl, targets):
        a, b = fal[f"base_model.model.{bfl}.lora_A.weight"], fal[f"base_model.model.{bfl}.lora_B.weight"]
        start = 0
        for name, rows in targets:
            out[f"transformer.{name}.lora_A.weight"] = a
            out[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(b[start:start + rows])
            start += rows
        assert start == b.shape[0]

    split("double_blocks.0.img_attn.qkv", [(f"transformer_blocks.0.attn.to_{p}", HIDDEN) for p in "qkv"])
    split("single_blocks.0.linear1", [*((f"single_transformer_blocks.0.attn.to_{p}", HIDDEN) for p in "qkv"),
                                      ("single_transformer_blocks.0.proj_mlp", MLP)])
    split("double_blocks.1.txt_mlp.0", [("transformer_blocks.1.ff_context.net.0.proj", MLP)])
    split("single_blocks.1.linear2", [("single_transformer_blocks.1.proj_out", HIDDEN)])
    split("img_in", [("x_embedder", HIDDEN)])
    save_file(out, str(path))
    return path


def generate(root, alias, config, **kwargs) -> np.ndarray:
    flux = Flux1.from_alias(alias, path=root, precision="float32", progress=False, **kwargs)
    image = flux.generate_image(SEED, PROMPT, config, progress=False)
    return np.asarray(image.image).astype(np.int16)


def diff(a, b) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="module")
def ckpt(tiny_flux):
    return {alias: tiny_flux(alias) for alias in ALIASES}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def images(ckpt, files):
    """(mode, quantize) -> the GeneratedImage of seed 1, computed once per module."""
    cache = {}

    def get(mode, quantize=None):
        if (mode, quantize) not in cache:
            alias, _ = MODES[mode]
            flux = Flux1.from_alias(alias, path=ckpt[alias], precision="float32", quantize=quantize,
                                    progress=False)
            cache[mode, quantize] = flux.generate_image(SEED, PROMPT, config_for(mode, files), progress=False)
        return cache[mode, quantize]

    return get


@pytest.fixture(scope="module")
def float32_images(images):
    """mode -> the float32 image's pixels."""
    return lambda mode: np.asarray(images(mode).image).astype(np.int16)


# -- quantized ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_8bit_is_close_to_float32(mode, images, float32_images):
    image = images(mode, 8)
    assert image.quantization == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert image.metadata()["mode"] == METADATA_MODE[mode]
    got = np.asarray(image.image)
    assert got.shape == (*SIZE[mode][::-1], 3)
    mean, worst = diff(got, float32_images(mode))
    assert mean < MEAN_BOUND[8] and worst <= MAX_BOUND[8], (mode, mean, worst)


def test_4bit_kontext_is_within_4bit_error(images, float32_images):
    errors = {bits: diff(np.asarray(images("kontext", bits).image), float32_images("kontext")) for bits in (8, 4)}
    assert images("kontext", 4).quantization["bits"] == 4
    assert errors[4][0] < MEAN_BOUND[4] and errors[4][1] <= MAX_BOUND[4], errors
    assert errors[4][0] > errors[8][0], errors  # 4-bit really is coarser: the layers were quantized


# -- saved folders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_float32(ckpt, tmp_path_factory):
    """alias -> a full-precision float32 folder written by save_model from the tiny checkpoint."""
    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = save_model(tmp_path_factory.mktemp("saved") / alias, alias, source=ckpt[alias],
                                      precision="float32")
        return cache[alias]

    return get


@pytest.mark.parametrize("mode", MODES)
def test_full_precision_saved_folder_is_bit_identical(mode, saved_float32, files, float32_images):
    alias, _ = MODES[mode]
    out = saved_float32(alias)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == alias and manifest["quantization"] is None
    np.testing.assert_array_equal(generate(out, alias, config_for(mode, files)), float32_images(mode))


def test_saved_folder_of_one_alias_is_refused_under_another(saved_float32):
    """A saved Fill folder cannot be loaded as Canny (384 vs 128 input channels): named, not garbage."""
    with pytest.raises(ValueError, match="384 input channels.*'dev-canny' needs 128"):
        Flux1.from_alias("dev-canny", path=saved_float32("dev-fill"), precision="float32", progress=False)


# -- LoRAs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    out = {"peft": write_lora(folder / "style.safetensors", seed=5)}
    for alias in ("dev-kontext", "dev-fill"):
        fal = write_fal_lora(folder / f"fal_{alias}.safetensors", IN_CHANNELS[alias])
        out[alias] = fal
        out[f"{alias} as diffusers"] = fal_as_diffusers(fal, folder / f"fal_{alias}_diffusers.safetensors")
    return out


@pytest.mark.parametrize("mode", ["kontext", "fill"])
def test_two_loras_one_in_fal_kontext_format(mode, ckpt, files, loras, images, float32_images):
    alias, _ = MODES[mode]
    root, config = ckpt[alias], config_for(mode, files)
    paths, scales = [str(loras["peft"]), str(loras[alias])], [0.8, 1.2]
    plain = float32_images(mode)

    flux = Flux1.from_alias(alias, path=root, precision="float32", lora_paths=paths, lora_scales=scales,
                            progress=False)
    image = flux.generate_image(SEED, PROMPT, config, progress=False)
    merged = np.asarray(image.image).astype(np.int16)
    assert diff(merged, plain)[0] > 1.0, "the LoRAs did not change the image"
    meta = image.metadata()
    assert [(x["name"], x["scale"]) for x in meta["loras"]] == [("style", 0.8), (f"fal_{alias}", 1.2)]
    assert meta["mode"] == METADATA_MODE[mode]

    # the side path (lora_merge=False) gives the same image as the merged weights, within float rounding
    side = generate(root, alias, config, lora_paths=paths, lora_scales=scales, lora_merge=False)
    mean, worst = diff(side, merged)
    assert mean < 0.05 and worst <= 2, (mean, worst)

    # the fal file alone is applied to the right layers: the same deltas in diffusers names, split by
    # rows out of the fused qkv / linear1, give the same image
    fal = generate(root, alias, config, lora_paths=[paths[1]], lora_scales=[1.2])
    assert diff(fal, plain)[0] > 1.0, "the fal LoRA did not change the image"
    same = generate(root, alias, config, lora_paths=[str(loras[f"{alias} as diffusers"])], lora_scales=[1.2])
    mean, worst = diff(same, fal)
    assert mean < 0.05 and worst <= 2, (mean, worst)

    # on an 8-bit model the LoRAs run as a side path on the quantized layers
    q8 = Flux1.from_alias(alias, path=root, precision="float32", quantize=8, lora_paths=paths,
                          lora_scales=scales, progress=False)
    image = q8.generate_image(SEED, PROMPT, config, progress=False)
    got = np.asarray(image.image)
    assert image.quantization["bits"] == 8 and len(image.loras) == 2
    mean, worst = diff(got, merged)
    assert mean < 2 * MEAN_BOUND[8] and worst <= 2 * MAX_BOUND[8], (mean, worst)
    assert diff(got, np.asarray(images(mode, 8).image))[0] > 1.0


def test_lora_baked_into_a_saved_kontext_folder(ckpt, files, loras, tmp_path):
    """save_model with the fal LoRA baked (float32): same image as the LoRA merged at runtime."""
    root, config = ckpt["dev-kontext"], config_for("kontext", files)
    out = save_model(tmp_path / "baked", "dev-kontext", source=root, precision="float32",
                     lora_paths=[loras["dev-kontext"]], lora_scales=[1.2])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "dev-kontext"
    assert [(x["name"], x["scale"]) for x in manifest["loras"]] == [("fal_dev-kontext.safetensors", 1.2)]
    flux = Flux1.from_alias("dev-kontext", path=out, precision="float32", progress=False)
    image = flux.generate_image(SEED, PROMPT, config, progress=False)
    assert image.metadata()["loras"] == [{"name": "fal_dev-kontext", "scale": 1.2, "baked": True}]
    runtime = generate(root, "dev-kontext", config, lora_paths=[str(loras["dev-kontext"])], lora_scales=[1.2])
    mean, worst = diff(np.asarray(image.image), runtime)
    assert mean < 0.05 and worst <= 2, (mean, worst)


# -- metadata ---------------------------------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", MODES)
def test_png_metadata_records_mode_and_inputs(mode, files, images, tmp_path):
    alias, _ = MODES[mode]
    meta = read_png_metadata(images(mode).save(tmp_path / "out.png"))
    info, params = meta["flux_1"], meta["parameters"]
    assert info["mode"] == METADATA_MODE[mode] and info["model"] == alias
    assert (info["width"], info["height"]) == SIZE[mode] and info["seed"] == SEED
    expected = {"img2img": {"image"}, "kontext": {"image"}, "fill": {"image", "mask"}, "outpaint": {"image"},
                "canny": {"control_image"}, "depth": {"control_image"}}[mode]
    assert set(info["inputs"]) == expected
    source = {"image": files["image"], "mask": files["mask"], "control_image": files["control"]}
    for key, record in info["inputs"].items():
        assert record == {"file": source[key].name, "sha256": sha256(source[key])}
    if mode == "img2img":
        assert info["image_strength"] == 0.5 and "Denoising strength: 0.5" in params
    elif mode in ("fill", "outpaint"):  # Fill starts from noise by default: A1111's denoising strength 1
        assert info["image_strength"] == 0.0 and "Denoising strength: 1," in params
    else:
        assert "image_strength" not in info and "Denoising strength" not in params
    assert info.get("outpaint") == ([16, 0, 0, 16] if mode == "outpaint" else None)
    assert info.get("auto_resize") == (False if mode == "kontext" else None)
    assert f"Model: flux1-{alias}" in params and f"Size: {SIZE[mode][0]}x{SIZE[mode][1]}" in params


def test_saved_folder_loaded_as_another_model_warns(tiny_flux, tmp_path):
    out = save_model(tmp_path / "kontext", "dev-kontext", source=tiny_flux("dev-kontext"), precision="float32")
    with pytest.warns(UserWarning, match=r"was saved as 'dev-kontext'; loaded as 'dev'"):
        Flux1.from_alias("dev", path=out, precision="float32", progress=False)
