"""`flux1-generate` with input images: each mode end to end on tiny checkpoints, and every bad input refused
before the model loads, naming the flag or the file."""

import numpy as np
import pytest
from PIL import Image

from flux_1.cli.main import main
from flux_1.pipeline.metadata import read_png_metadata
from tests.cli.common import assert_refused, run_main


@pytest.fixture(scope="module")
def ckpt(tiny_flux):
    """Built before capsys captures stderr (the tokenizer trainer needs the real one)."""
    return {v: tiny_flux(v) for v in ("schnell", "dev", "dev-kontext", "dev-fill", "dev-canny", "dev-depth")}


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:40, :60]).save(folder / "mask_small.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return folder


def argv(ckpt, model, out, *extra) -> list[str]:
    return ["--model", model, "--path", str(ckpt), "--prompt", "make it winter", "--steps", "2", "--seed", "1",
            "--precision", "float32", "--output", str(out), *map(str, extra)]


def test_kontext_example_from_the_readme(ckpt, files, tmp_path, capsys):
    out = tmp_path / "kontext.png"
    code, stdout, stderr = run_main(main, argv(ckpt["dev-kontext"], "dev-kontext", out,
                                               "--image-path", files / "in.png", "--no-auto-resize"), capsys)
    assert code == 0, stderr
    meta = read_png_metadata(out)
    assert meta["flux_1"]["mode"] == "kontext" and meta["flux_1"]["inputs"]["image"]["file"] == "in.png"
    assert meta["flux_1"]["guidance"] == 2.5 and Image.open(out).size == (64, 48)


def test_img2img_records_denoising_strength(ckpt, files, tmp_path, capsys):
    out = tmp_path / "img2img.png"
    code, _, stderr = run_main(main, argv(ckpt["dev"], "dev", out, "--image-path", files / "in.png",
                                          "--image-strength", "0.25", "--steps", "4"), capsys)
    assert code == 0, stderr
    meta = read_png_metadata(out)
    assert "Denoising strength: 0.75" in meta["parameters"] and meta["flux_1"]["image_strength"] == 0.25


def test_fill_with_a_mask_of_another_size_warns(ckpt, files, tmp_path, capsys):
    out = tmp_path / "fill.png"
    code, _, stderr = run_main(main, argv(ckpt["dev-fill"], "dev-fill", out, "--image-path",
                                          files / "in.png", "--mask-path", files / "mask_small.png",
                                          "--outpaint", "16,0,0,16"), capsys)
    assert code == 0, stderr
    assert "warning: mask" in stderr and "is resized" in stderr
    assert Image.open(out).size == (80, 64)  # 70+16 x 50+16, rounded down to 16
    assert read_png_metadata(out)["flux_1"]["outpaint"] == [16, 0, 0, 16]


def test_control(ckpt, files, tmp_path, capsys):
    out = tmp_path / "canny.png"
    code, _, stderr = run_main(main, argv(ckpt["dev-canny"], "dev-canny", out, "--control-image-path",
                                          files / "in.png"), capsys)
    assert code == 0, stderr
    assert read_png_metadata(out)["flux_1"]["inputs"]["control_image"]["file"] == "in.png"


@pytest.mark.parametrize("model, extra, expected", [
    ("dev", ["--image-path", "{f}/missing.png"], ["image", "missing.png", "does not exist"]),
    ("dev", ["--image-path", "{f}/broken.png"], ["image", "broken.png", "is not a readable image"]),
    ("dev", ["--image-path", "{f}"], ["is not a file"]),
    ("dev", ["--mask-path", "{f}/mask.png"], ["'dev' takes no --mask-path"]),
    ("schnell", ["--control-image-path", "{f}/in.png"], ["'schnell' takes no --control-image-path"]),
    ("dev-canny", ["--image-path", "{f}/in.png", "--control-image-path", "{f}/in.png"],
     ["give it as --control-image-path, not --image-path"]),
    ("dev-kontext", [], ["'dev-kontext' needs an input image: give --image-path"]),
    ("dev-fill", ["--image-path", "{f}/in.png"], ["needs a mask (--mask-path"]),
    ("dev-fill", ["--image-path", "{f}/in.png", "--mask-path", "{f}/missing.png"], ["mask", "does not exist"]),
    ("dev-depth", [], ["needs a control image", "--control-image-path"]),
    ("dev", ["--image-path", "{f}/in.png", "--image-strength", "1"], ["--image-strength must be in [0, 1)"]),
    ("dev", ["--image-path", "{f}/in.png", "--image-strength", "-0.1"], ["--image-strength must be in [0, 1)"]),
    ("dev", ["--image-strength", "0.3"], ["--image-strength is given without --image-path"]),
    ("dev-fill", ["--image-path", "{f}/in.png", "--outpaint", "1,2,3"], ["--outpaint", "TOP,RIGHT,BOTTOM,LEFT"]),
])
def test_bad_inputs_are_refused_before_loading(ckpt, files, tmp_path, capsys, no_model_load,
                                               model, extra, expected):
    extra = [e.format(f=files) for e in extra]
    result = run_main(main, argv(ckpt[model], model, tmp_path / "out" / "x.png", *extra), capsys)
    assert_refused(result, expected, tmp_path / "out")
