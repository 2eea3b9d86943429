"""`flux1-generate` / `python main.py` end to end on the tiny checkpoints, and every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_1.cli.main import main
from flux_1.loading.hub import HubError
from flux_1.loading.weights import WeightLoadError
from flux_1.pipeline import flux1
from flux_1.pipeline.metadata import read_png_metadata
from tests.cli.common import assert_refused, pixels, run_main, write_lora

REPO = Path(__file__).resolve().parents[2]
SAVED = REPO / "tests" / "fixtures" / "saved_v1"
BAD_PROMPT = b"a fox \xff".decode("utf-8", "surrogateescape")  # what argv gives for non-UTF-8 bytes


def fast(ckpt, *extra) -> list[str]:
    return ["--model", "schnell", "--path", str(ckpt), "--prompt", "a fox in the snow", "--steps", "1",
            "--height", "32", "--width", "48", "--precision", "float32", *map(str, extra)]


def with_args(ckpt, **changes) -> list[str]:
    """`fast(ckpt)` with flags set (a list for several values, [] for a switch) or removed (None)."""
    argv = fast(ckpt)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        values = [] if value is None else list(map(str, value if isinstance(value, list) else [value]))
        if flag in argv:
            i = argv.index(flag)
            argv[i: i + 2] = []
        if value is not None:
            argv += [flag, *values]
    return argv


def run(argv, capsys) -> tuple[int, str, str]:
    return run_main(main, argv, capsys)


# -- what gets written --------------------------------------------------------------------------------


def test_png_with_metadata_chunks_and_sidecar(tiny_schnell, tmp_path, capsys):
    out = tmp_path / "fox.png"
    prompt = "Café au lait, 東京 🦊"
    code, stdout, _ = run(with_args(tiny_schnell, seed=7, metadata=[], output=out, prompt=prompt), capsys)
    assert code == 0
    assert f"Saved {out}" in stdout
    with Image.open(out) as im:
        assert im.size == (48, 32)
    meta = read_png_metadata(out)
    assert meta["parameters"] == (
        f"{prompt}\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 7, Size: 48x32, Model: flux1-schnell, "
        f"Version: flux_1 {meta['flux_1']['version']}"
    )
    info = meta["flux_1"]
    assert (info["model"], info["seed"], info["steps"]) == ("schnell", 7, 1)
    assert (info["width"], info["height"]) == (48, 32)
    assert info["prompt"] == prompt and info["precision"] == "float32" and info["quantization"] is None
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8")) == info


def test_same_seed_same_pixels_and_no_overwrite(tiny_schnell, tmp_path, capsys):
    out = tmp_path / "img.png"
    for _ in range(2):
        assert run(fast(tiny_schnell, "--seed", 3, "--output", out), capsys)[0] == 0
    second = tmp_path / "img_1.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "img_1.png"]
    np.testing.assert_array_equal(pixels(out), pixels(second))
    assert read_png_metadata(second)["flux_1"]["seed"] == 3


def test_several_seeds_one_load_seed_template_and_parent_folders(tiny_schnell, tmp_path, capsys, count_loads):
    template = tmp_path / "a" / "b" / "fox_{seed}.png"
    code, stdout, _ = run(fast(tiny_schnell, "--seed", 1, 2, "--output", template), capsys)
    assert code == 0 and len(count_loads) == 1
    one, two = tmp_path / "a" / "b" / "fox_1.png", tmp_path / "a" / "b" / "fox_2.png"
    assert "Generating with seed 1" in stdout and "Generating with seed 2" in stdout
    assert [read_png_metadata(p)["flux_1"]["seed"] for p in (one, two)] == [1, 2]
    assert not np.array_equal(pixels(one), pixels(two))


def test_several_seeds_without_seed_field_get_distinct_names(tiny_schnell, tmp_path, capsys):
    assert run(fast(tiny_schnell, "--seed", 5, 6, "--output", tmp_path / "x.png"), capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_seed_5.png", "x_seed_6.png"]


def test_size_rounds_down_to_16_with_a_warning(tiny_schnell, tmp_path, capsys):
    argv = with_args(tiny_schnell, seed=0, output=tmp_path / "r.png", height=40, width=60)
    code, _, stderr = run(argv, capsys)
    assert code == 0
    assert "height 40 is not a multiple of 16: using 32" in stderr
    assert "width 60 is not a multiple of 16: using 48" in stderr
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (48, 32)
    assert "Size: 48x32" in read_png_metadata(tmp_path / "r.png")["parameters"]


def test_random_seed_default_steps_and_ignored_guidance(tiny_schnell, tmp_path, capsys):
    argv = with_args(tiny_schnell, output=tmp_path / "r_{seed}.png", guidance=5, steps=None)  # 4 steps
    code, stdout, stderr = run(argv, capsys)
    assert code == 0
    seed = int(stdout.split("Generating with seed ")[1].split()[0])
    (path,) = tmp_path.iterdir()
    assert path.name == f"r_{seed}.png"
    info = read_png_metadata(path)["flux_1"]
    assert info["seed"] == seed and info["steps"] == 4 and info["guidance"] is None
    assert "--guidance is ignored" in stderr


def test_verbose_timings_and_quantize(tiny_schnell, tmp_path, capsys):
    argv = fast(tiny_schnell, "-v", "-q", 8, "--seed", 1, "--output", tmp_path / "q.png")
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    for stage in ("load:", "text encoding:", "denoising:", "decoding:", "peak memory"):
        assert stage in stdout
    meta = read_png_metadata(tmp_path / "q.png")
    assert meta["flux_1"]["quantization"]["bits"] == 8
    assert "Quantization: 8-bit" in meta["parameters"]


def test_dev_records_distilled_guidance(tiny_dev, tmp_path, capsys):
    argv = with_args(tiny_dev, model="dev", seed=1, guidance=2.5, output=tmp_path / "d.png")
    assert run(argv, capsys)[0] == 0
    meta = read_png_metadata(tmp_path / "d.png")
    assert "CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 1" in meta["parameters"]
    assert "Model: flux1-dev" in meta["parameters"]
    assert meta["flux_1"]["guidance"] == 2.5


def test_python_main_py_subprocess(tiny_schnell, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "sub" / "fox.png"
    argv = fast(tiny_schnell, "--seed", 11, "--metadata", "-o", out)
    result = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as im:
        assert im.size == (48, 32)
    meta = read_png_metadata(out)
    assert "Seed: 11, Size: 48x32" in meta["parameters"] and meta["flux_1"]["seed"] == 11
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 11

    argv = with_args(tiny_schnell, output=tmp_path / "bad.png", steps=0)
    bad = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "--steps" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.png").exists()


# -- bad input: clear message naming the culprit, non-zero exit, no traceback, no file, no model load ----


def truncated_copy(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    shard = dst / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    return dst, shard.name


def without_component(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "vae")
    (dst / "ae.safetensors").unlink(missing_ok=True)  # the BFL single-file VAE would stand in for vae/
    return dst


BAD_INPUTS = {
    "unknown model": (lambda c, t: with_args(c, model="turbo"), ["--model", "'turbo'"]),
    "missing path": (lambda c, t: with_args(c, path=t / "nowhere"), ["nowhere", "does not exist"]),
    "path is a file": (lambda c, t: with_args(c, path=c / "model_index.json"),
                       ["model_index.json", "not a folder"]),
    "missing component": (lambda c, t: with_args(without_component(c, t / "ck")), ["vae/"]),
    "corrupt weights": (lambda c, t: with_args(truncated_copy(c, t / "ck")[0]),
                        ["diffusion_pytorch_model-00002-of-00002.safetensors", "truncated"]),
    "zero steps": (lambda c, t: with_args(c, steps=0), ["--steps", "at least 1"]),
    "negative steps": (lambda c, t: with_args(c, steps=-3), ["--steps", "-3"]),
    "empty prompt": (lambda c, t: with_args(c, prompt=""), ["--prompt", "empty"]),
    "blank prompt": (lambda c, t: with_args(c, prompt="   "), ["--prompt", "empty"]),
    "bad quantize bits": (lambda c, t: with_args(c, quantize=7), ["--quantize", "'7'", "mxfp4"]),
    "bad quantize mode": (lambda c, t: with_args(c, quantize="fp3"), ["--quantize", "'fp3'"]),
    "missing lora": (lambda c, t: with_args(c, lora_paths=t / "nope.safetensors"), ["nope.safetensors"]),
    "lora scale count": (lambda c, t: with_args(c, lora_paths=c / "model_index.json", lora_scales=[0.5, 1]),
                         ["2 --lora-scales for 1 --lora-paths"]),
    "lora scales alone": (lambda c, t: with_args(c, lora_scales=0.5),
                          ["--lora-scales", "without --lora-paths"]),
    "height below 16": (lambda c, t: with_args(c, height=8), ["--height", "at least 16"]),
    "width below 16": (lambda c, t: with_args(c, width=0), ["--width", "at least 16"]),
    "negative seed": (lambda c, t: with_args(c, seed=-1), ["--seed", "-1"]),
    "not a png": (lambda c, t: with_args(c, output=t / "out" / "img.jpg"), ["img.jpg", ".png"]),
    "bad template": (lambda c, t: with_args(c, output=t / "out" / "{sed}.png"), ["{sed}", "{seed}"]),
    "output under a file": (lambda c, t: with_args(c, output=c / "model_index.json" / "x.png"),
                            ["model_index.json", "not a folder"]),
    "unknown precision": (lambda c, t: with_args(c, precision="float8"), ["--precision", "'float8'"]),
    "nan guidance": (lambda c, t: with_args(c, guidance="nan"), ["--guidance", "nan", "finite"]),
    "inf guidance": (lambda c, t: with_args(c, guidance="inf"), ["--guidance", "inf", "finite"]),
    "nan lora scale": (lambda c, t: with_args(c, lora_paths=write_lora(t / "l.safetensors"), lora_scales="nan"),
                       ["--lora-scales", "nan", "finite"]),
    "huge steps": (lambda c, t: with_args(c, steps=10**9), ["--steps", "at most 10000"]),
    "huge width": (lambda c, t: with_args(c, width=2**63), ["--width", "at most 65536"]),
    "size beyond memory": (lambda c, t: with_args(c, width=65536, height=65536),
                           ["65536x65536 needs about", "GiB", "smaller size"]),
    "undecodable prompt": (lambda c, t: with_args(c, prompt=BAD_PROMPT), ["--prompt", "not valid UTF-8"]),
    "foreign lora": (lambda c, t: with_args(c, lora_paths=sdxl_lora(t)), ["sdxl.safetensors", "not a FLUX.1"]),
    "lora shape mismatch": (lambda c, t: with_args(c, lora_paths=misshapen_lora(t)),
                            ["misshapen.safetensors", "shape"]),
    "corrupt saved shard": (lambda c, t: with_args(c, path=corrupt_saved(t)), ["model.safetensors", "header"]),
}


def sdxl_lora(t: Path) -> Path:
    from safetensors.numpy import save_file

    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": np.zeros((4, 8), np.float32),
               f"{stem}.lora_up.weight": np.zeros((8, 4), np.float32)}, str(t / "sdxl.safetensors"))
    return t / "sdxl.safetensors"


def misshapen_lora(t: Path) -> Path:
    from safetensors.numpy import save_file

    stem = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{stem}.lora_A.weight": np.zeros((4, 99), np.float32),
               f"{stem}.lora_B.weight": np.zeros((64, 4), np.float32)}, str(t / "misshapen.safetensors"))
    return t / "misshapen.safetensors"


def corrupt_saved(t: Path) -> Path:
    root = Path(shutil.copytree(SAVED, t / "saved"))
    # A header length, then no JSON. (An all-0xff length currently escapes read_header as an
    # OverflowError: reported to the loading/ owner.)
    (root / "transformer" / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"not json at all!")
    return root


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input(case, tiny_schnell, tmp_path, capsys, no_model_load):
    make_argv, expected = BAD_INPUTS[case]
    argv = make_argv(tiny_schnell, tmp_path)
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out" / "img.png")]
    assert_refused(run(argv, capsys), expected, tmp_path)


def test_hub_errors_are_printed_as_they_are(tmp_path, capsys, monkeypatch):
    message = "black-forest-labs/FLUX.1-dev is gated: accept its licence, then run `hf auth login`."

    def gated(repo_id):
        raise HubError(message)

    monkeypatch.setattr("flux_1.loading.hub.download", gated)
    argv = ["--model", "dev", "--prompt", "a fox", "--output", str(tmp_path / "out" / "x.png")]
    code, _, stderr = run(argv, capsys)
    assert code == 1
    assert message in stderr.splitlines() and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_errors_while_loading_exit_cleanly(tiny_schnell, tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise WeightLoadError("transformer: 'img_in.weight' has shape (3, 4), expected (64, 64)")

    monkeypatch.setattr(flux1.Flux1, "__init__", fails)
    code, _, stderr = run(fast(tiny_schnell, "--output", tmp_path / "out" / "x.png"), capsys)
    assert code == 1 and "error: transformer: 'img_in.weight'" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


# -- issue #9: output folders, atomic sidecars, early warnings, -v --------------------------------------


@pytest.mark.parametrize("kind", ["trailing slash", "existing folder"])
def test_output_folder_gets_the_default_name(tiny_schnell, tmp_path, capsys, kind):
    folder = tmp_path / "renders"
    if kind == "existing folder":
        folder.mkdir()
    out = str(folder) + ("/" if kind == "trailing slash" else "")
    assert run(with_args(tiny_schnell, seed=5, output=out), capsys)[0] == 0
    assert [p.name for p in folder.iterdir()] == ["flux_5.png"]
    assert not (tmp_path / "renders.png").exists()


def test_full_disk_on_the_sidecar_writes_nothing(tiny_schnell, tmp_path, capsys, monkeypatch):
    import errno

    from flux_1.pipeline import metadata

    original = metadata._claim

    def claim(tmp, target):
        if target.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tmp, target)

    monkeypatch.setattr(metadata, "_claim", claim)
    code, stdout, stderr = run(with_args(tiny_schnell, seed=1, metadata=[], output=tmp_path / "o.png"), capsys)
    assert code == 1 and "error: [Errno 28] No space left on device" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_dev_on_schnell_weights_warns_before_generating(tiny_schnell, tmp_path, capsys):
    code, stdout, stderr = run(with_args(tiny_schnell, model="dev", seed=1, output=tmp_path / "d.png"), capsys)
    assert code == 0
    assert "schnell-like (no guidance embedder) transformer; loaded as 'dev': guidance is ignored" in stderr
    assert stderr.index("guidance is ignored") < stderr.index("loading transformer")
    meta = read_png_metadata(tmp_path / "d.png")
    assert meta["flux_1"]["guidance"] is None and "Distilled CFG" not in meta["parameters"]


def test_progress_for_every_stage_and_blas_line_with_verbose(tiny_schnell, tmp_path, capsys):
    code, stdout, stderr = run(with_args(tiny_schnell, seed=1, v=[], output=tmp_path / "v.png"), capsys)
    assert code == 0
    assert "BLAS" in stdout.splitlines()[0]
    for stage in ("loading vae", "loading clip", "loading t5", "loading transformer", "text encoding",
                  "denoising", "decoding"):
        assert stage in stderr


def test_lora_with_generate_is_applied_and_staged(tiny_schnell, tmp_path, capsys):
    lora = write_lora(tmp_path / "style.safetensors", clip=True)
    code, stdout, stderr = run(with_args(tiny_schnell, seed=1, lora_paths=lora, output=tmp_path / "l.png"), capsys)
    assert code == 0
    assert stderr.index("loading t5") < stderr.index("text encoding") < stderr.index("loading transformer")
    assert read_png_metadata(tmp_path / "l.png")["flux_1"]["loras"][0]["name"] == "style"


def test_undecodable_argv_prompt_subprocess(tiny_schnell, tmp_path):
    argv = [sys.executable, str(REPO / "main.py"), *with_args(tiny_schnell, output=tmp_path / "x.png")]
    argv[argv.index("a fox in the snow")] = "a fox \udcff"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, env=env, timeout=300)
    assert r.returncode == 2 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())
