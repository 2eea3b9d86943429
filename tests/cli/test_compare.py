"""`flux1-compare` / `python compare.py` on the tiny checkpoints: files, grid, exact baseline, bad input."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from flux_1.cli import compare
from flux_1.cli.compare import main
from flux_1.pipeline import flux1
from flux_1.pipeline.metadata import read_png_metadata
from tests.cli.common import HIDDEN, assert_refused, pixels, run_main, write_lora

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a fox in the snow"
W, H = 64, 32


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "tiny_style.safetensors")


def args_for(ckpt, out, *extra, model="dev") -> list[str]:
    return ["--model", model, "--path", str(ckpt), "--prompt", PROMPT, "--steps", "1", "--height", str(H),
            "--width", str(W), "--precision", "float32", "--output-dir", str(out), *map(str, extra)]


def run(argv, capsys) -> tuple[int, str, str]:
    return run_main(main, argv, capsys)


def cells(grid: np.ndarray, n: int, w: int, h: int, columns: int = 4):
    """(caption strip, image) pixel blocks of each of the n cells, read off the bottom of the grid."""
    cap = compare.caption_height(w)
    rows = math.ceil(n / columns)
    top = grid.shape[0] - rows * (cap + h)
    out = []
    for i in range(n):
        x, y = (i % columns) * w, top + (i // columns) * (cap + h)
        out.append((grid[y: y + cap, x: x + w], grid[y + cap: y + cap + h, x: x + w]))
    return top, out


# -- a full comparison -----------------------------------------------------------------------------------


def test_strengths_grid_metadata_one_load_and_exact_baseline(tiny_dev, lora_file, tmp_path, capsys,
                                                              count_loads):
    out = tmp_path / "new" / "comparison"
    strengths = ["0", "0.5", "1", "1.5"]
    code, stdout, stderr = run(args_for(tiny_dev, out, "--lora-paths", lora_file, "--seed", 42,
                                        "--strengths", *strengths), capsys)
    assert code == 0, stderr
    assert len(count_loads) == 1
    names = [f"strength_{s}.png" for s in strengths]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "grid.png"])
    for s in strengths:
        assert f"Saved {out / f'strength_{s}.png'}" in stdout
    assert f"Saved {out / 'grid.png'}" in stdout

    # every image: same seed and settings, the LoRA at the applied scale
    for s, name in zip(strengths, names, strict=True):
        meta = read_png_metadata(out / name)
        info = meta["flux_1"]
        assert (info["seed"], info["steps"], info["width"], info["height"]) == (42, 1, W, H)
        assert info["prompt"] == PROMPT and info["model"] == "dev"
        assert [(lora["name"], lora["scale"]) for lora in info["loras"]] == [("tiny_style", float(s))]
        assert f'LoRAs: "tiny_style: {s}"' in meta["parameters"]

    # strength 0 is, pixel for pixel, the model without any LoRA; strength 1 is not
    plain = flux1.Flux1.from_alias("dev", path=tiny_dev, precision="float32")
    assert plain.lora_info() == []
    config = flux1.Config(1, H, W, 3.5)
    reference = plain.generate_image(seed=42, prompt=PROMPT, config=config, progress=False)
    reference = np.asarray(reference.image.convert("RGB"))
    np.testing.assert_array_equal(pixels(out / "strength_0.png"), reference)
    for s in ("0.5", "1", "1.5"):
        assert np.abs(pixels(out / f"strength_{s}.png").astype(int) - reference).max() > 8, s

    # the grid: 4 cells in one row, each image under its caption strip, below the header
    grid = pixels(out / "grid.png")
    cap = compare.caption_height(W)
    assert grid.shape[1] == 4 * W
    top, blocks = cells(grid, 4, W, H)
    assert top >= cap and top % cap == 0  # the header: whole lines
    assert (grid[:top] != 255).any(), "the header is blank"
    for name, (caption, image) in zip(names, blocks, strict=True):
        assert (caption != 255).any(), f"the caption of {name} is blank"
        np.testing.assert_array_equal(image, pixels(out / name))

    grid_meta = read_png_metadata(out / "grid.png")
    assert grid_meta["parameters"].startswith(f"{PROMPT}\nSteps: 1, ")
    assert "Seed: 42" in grid_meta["parameters"]
    assert 'LoRA strengths: "0, 0.5, 1, 1.5"' in grid_meta["parameters"]
    info = grid_meta["flux_1"]
    assert info["seed"] == 42 and info["loras"][0]["scale"] == 1.0
    assert info["comparison"]["strengths"] == [0.0, 0.5, 1.0, 1.5]
    assert info["comparison"]["images"] == names
    assert (info["comparison"]["grid_width"], info["comparison"]["grid_height"]) == grid.shape[1::-1]


def test_two_loras_base_scales_clip_and_no_overwrite(tiny_schnell, lora_file, tmp_path, capsys, count_loads):
    other = write_lora(tmp_path / "other.safetensors", seed=1, clip=True)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "strength_0.png").write_bytes(b"not mine")
    (out / "grid.png").write_bytes(b"not mine either")
    argv = args_for(tiny_schnell, out, "--lora-paths", lora_file, other, "--lora-scales", 0.5, 2,
                    "--strengths", 1, 0, "--seed", 7, model="schnell")
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert len(count_loads) == 1
    assert (out / "strength_0.png").read_bytes() == b"not mine"
    assert (out / "grid.png").read_bytes() == b"not mine either"
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "grid_1.png", "strength_0.png", "strength_0_1.png", "strength_1.png"]
    scales = {name: [(x["name"], x["scale"]) for x in read_png_metadata(out / name)["flux_1"]["loras"]]
              for name in ("strength_1.png", "strength_0_1.png")}
    assert scales == {"strength_1.png": [("tiny_style", 0.5), ("other", 2.0)],
                      "strength_0_1.png": [("tiny_style", 0.0), ("other", 0.0)]}
    # the baseline is exact with a CLIP LoRA too (the text encoders are reloaded and re-patched)
    plain = flux1.Flux1.from_alias("schnell", path=tiny_schnell, precision="float32")
    reference = plain.generate_image(seed=7, prompt=PROMPT, config=flux1.Config(1, H, W), progress=False)
    reference = np.asarray(reference.image.convert("RGB"))
    np.testing.assert_array_equal(pixels(out / "strength_0_1.png"), reference)
    assert not np.array_equal(pixels(out / "strength_1.png"), pixels(out / "strength_0_1.png"))
    # grid cells in the order given: strength 1 first
    grid = pixels(out / "grid_1.png")
    assert grid.shape[1] == 2 * W
    _, blocks = cells(grid, 2, W, H)
    np.testing.assert_array_equal(blocks[0][1], pixels(out / "strength_1.png"))
    np.testing.assert_array_equal(blocks[1][1], pixels(out / "strength_0_1.png"))
    info = read_png_metadata(out / "grid_1.png")["flux_1"]
    assert [(lora["name"], lora["scale"]) for lora in info["loras"]] == [("tiny_style", 0.5), ("other", 2.0)]
    assert info["comparison"]["images"] == ["strength_1.png", "strength_0_1.png"]


# -- the grid alone -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 5, 9])
def test_grid_wraps_after_four(n):
    w, h = 40, 24
    images = [Image.new("RGB", (w, h), (10 * i, 0, 200)) for i in range(n)]
    grid = compare.make_grid(images, [f"strength {i}" for i in range(n)], "LoRA: style x1 | seed 3")
    cols, rows = min(n, 4), math.ceil(n / 4)
    cap = compare.caption_height(w)
    header = grid.height - rows * (cap + h)
    assert grid.width == cols * w and header >= cap and header % cap == 0
    top, blocks = cells(np.asarray(grid), n, w, h)
    for im, (caption, block) in zip(images, blocks, strict=True):
        assert (caption != 255).any()
        np.testing.assert_array_equal(block, np.asarray(im))
    if n % 4:  # the unused cells of the last row stay background
        assert (np.asarray(grid)[top + (rows - 1) * (cap + h):, (n % 4) * w:] == 255).all()


def test_grid_header_wraps_and_odd_text_is_drawn():
    images = [Image.new("RGB", (32, 16), "black")] * 2
    long = "LoRA: " + ", ".join(f"very_long_lora_name_{i} x0.8" for i in range(6)) + " | seed 1"
    grid = compare.make_grid(images, ["strength 0", "strength 1"], long)
    cap = compare.caption_height(32)
    assert grid.height - (cap + 16) > cap  # several header lines
    compare.make_grid(images, ["strength 0", "strength 1"], "LoRA: 東京_🦊 x1 | seed 1")  # no error


def test_strength_labels():
    assert [compare.strength_label(s) for s in (0, -0.0, 0.5, 1.0, 1.5, -0.25, 2, 1e-5)] == [
        "0", "0", "0.5", "1", "1.5", "-0.25", "2", "1e-05"]
    # never rounded: distinct strengths get distinct names
    assert compare.strength_label(0.1234567) == "0.1234567"


# -- bad input: a clear message naming the culprit, non-zero exit, no traceback, no model load, no file ------


def corrupt_lora(t: Path) -> Path:
    path = t / "broken.safetensors"
    path.write_bytes(b"\xff" * 64)
    return path


def empty_lora(t: Path) -> Path:
    path = t / "empty.safetensors"
    save_file({}, str(path))
    return path


LORA = "--lora-paths"
BAD_INPUTS = {
    "no lora": (lambda c, t, x: [], ["--lora-paths", "no LoRA"]),
    "missing lora": (lambda c, t, x: [LORA, t / "nope.safetensors"], ["nope.safetensors"]),
    "lora is a folder": (lambda c, t, x: [LORA, c], ["not a file"]),
    "corrupt lora": (lambda c, t, x: [LORA, corrupt_lora(t)], ["broken.safetensors", "readable"]),
    "empty lora": (lambda c, t, x: [LORA, empty_lora(t)], ["empty.safetensors", "no tensors"]),
    "scale count": (lambda c, t, x: [LORA, x, "--lora-scales", 0.5, 1],
                    ["2 --lora-scales for 1 --lora-paths"]),
    "nan strength": (lambda c, t, x: [LORA, x, "--strengths", 0, "nan"], ["--strengths", "nan"]),
    "inf strength": (lambda c, t, x: [LORA, x, "--strengths", "inf"], ["--strengths", "inf"]),
    "duplicate strength": (lambda c, t, x: [LORA, x, "--strengths", 0, 1, "1.0"],
                           ["--strengths", "1 is given twice"]),
    "word strength": (lambda c, t, x: [LORA, x, "--strengths", 0, "half"], ["--strengths", "half"]),
    "no strength": (lambda c, t, x: [LORA, x, "--strengths"], ["--strengths"]),
    "inf lora scale": (lambda c, t, x: [LORA, x, "--lora-scales", "inf"], ["--lora-scales", "inf"]),
    "zero steps": (lambda c, t, x: [LORA, x, "--steps", 0], ["--steps", "at least 1"]),
    "negative seed": (lambda c, t, x: [LORA, x, "--seed", -1], ["--seed", "-1"]),
    "two seeds": (lambda c, t, x: [LORA, x, "--seed", 1, 2], ["unrecognized", "2"]),
    "missing model path": (lambda c, t, x: [LORA, x, "--path", t / "nowhere"], ["nowhere"]),
    "output dir is a file": (lambda c, t, x: [LORA, x, "--output-dir", c / "model_index.json"],
                             ["model_index.json", "not a folder"]),
    "output dir is a png": (lambda c, t, x: [LORA, x, "--output-dir", t / "out" / "x.png"],
                            ["x.png", "folder"]),
    "bad quantize": (lambda c, t, x: [LORA, x, "-q", 7], ["--quantize", "'7'"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input(case, tiny_dev, lora_file, tmp_path, capsys, no_model_load):
    make_extra, expected = BAD_INPUTS[case]
    argv = args_for(tiny_dev, tmp_path / "out", *make_extra(tiny_dev, tmp_path, lora_file))
    assert_refused(run(argv, capsys), expected, tmp_path)


def test_lora_that_does_not_fit_the_model_exits_cleanly(tiny_dev, tmp_path, capsys):
    bad = tmp_path / "wrong_shape.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 99), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((HIDDEN, 4), np.float32)},
              str(bad))
    code, stdout, stderr = run(args_for(tiny_dev, tmp_path / "out", "--lora-paths", bad), capsys)
    assert code == 1 and "error:" in stderr and "wrong_shape" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_python_compare_py_subprocess(tiny_schnell, lora_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "sub"
    argv = args_for(tiny_schnell, out, "--lora-paths", lora_file, "--strengths", 0, 1,
                    "-v", model="schnell")
    result = subprocess.run([sys.executable, "compare.py", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "strength_0.png", "strength_1.png"]
    seed = read_png_metadata(out / "strength_0.png")["flux_1"]["seed"]  # random, the same for all
    assert read_png_metadata(out / "strength_1.png")["flux_1"]["seed"] == seed
    assert f"seed {seed}" in result.stdout and "load:" in result.stdout and "denoising:" in result.stdout

    bad = subprocess.run([sys.executable, "compare.py", *args_for(tiny_schnell, out / "x", model="schnell")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--lora-paths" in bad.stderr and "Traceback" not in bad.stderr
