"""`flux1-save` / `python save.py`: a folder that runs with no -q, and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flux_1 import Config, Flux1
from flux_1.cli import main as generate_cli
from flux_1.cli.save import main
from flux_1.loading import saved

REPO = Path(__file__).resolve().parents[2]


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_save_then_generate_without_q(tiny_schnell, tmp_path, capsys):
    out = tmp_path / "schnell-4bit"
    code, stdout, err = run(["--model", "schnell", "--path", out, "-q", "4", "--source", tiny_schnell,
                             "--precision", "float32"], capsys)
    assert code == 0, err
    assert f"Saved schnell to {out}" in stdout and "transformer: loading and quantizing (4-bit" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert manifest["source"] == str(tiny_schnell.resolve())
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        assert (out / sub).is_dir()

    # The generate CLI runs it with no -q and records the saved quantization.
    png = tmp_path / "img.png"
    argv = ["--model", "schnell", "--path", str(out), "--prompt", "a fox", "--steps", "1", "--height", "32",
            "--width", "32", "--precision", "float32", "--seed", "1", "--output", str(png)]
    generate_cli.main(argv)
    assert png.exists()
    runtime = Flux1.from_alias("schnell", path=tiny_schnell, quantize=4, precision="float32")
    expected = runtime.generate_image(1, "a fox", Config(num_inference_steps=1, height=32, width=32),
                                      progress=False)
    from PIL import Image

    with Image.open(png) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected.image))


def test_existing_output_needs_overwrite(tiny_schnell, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    code, _, err = run(["--model", "schnell", "--path", out, "--source", tiny_schnell], capsys)
    assert code == 1 and err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["something"]
    code, _, err = run(["--model", "schnell", "--path", out, "--source", tiny_schnell, "--overwrite",
                        "-q", "8", "--precision", "float32"], capsys)
    assert code == 0, err
    assert saved.is_saved_folder(out) and not (out / "something").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-q", "7"], "invalid value '7'"),
        (["-q", "fp8"], "invalid value 'fp8'"),
        (["--lora-scales", "0.5"], "--lora-scales given without --lora-paths"),
        (["--lora-paths", "missing.safetensors"], "does not exist"),
        (["--precision", "float64"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    code, _, err = run(["--model", "schnell", "--path", tmp_path / "out", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_or_broken_source_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = run(["--model", "schnell", "--path", tmp_path / "out", "--source", missing], capsys)
    assert code == 1 and "does not exist" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    (broken / "tokenizer").mkdir(parents=True)
    (broken / "tokenizer_2").mkdir()
    code, _, err = run(["--model", "schnell", "--path", tmp_path / "out", "--source", broken], capsys)
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_root_script_help():
    result = subprocess.run([sys.executable, str(REPO / "save.py"), "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--overwrite" in result.stdout and "mxfp4" in result.stdout


@pytest.mark.parametrize("case", ["nan scale", "foreign lora", "misshapen lora"])
def test_bad_loras_are_refused_before_loading(case, tiny_schnell, tmp_path, capsys, monkeypatch):
    from safetensors.numpy import save_file

    from flux_1.pipeline import save_model
    from tests.cli.common import write_lora

    monkeypatch.setattr(save_model, "save_model", lambda *a, **k: pytest.fail("the model was loaded"))
    lora, extra, expected = tmp_path / "l.safetensors", [], ""
    if case == "nan scale":
        write_lora(lora)
        extra, expected = ["--lora-scales", "nan"], "--lora-scales #1 (for "
    elif case == "foreign lora":
        stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
        save_file({f"{stem}.lora_down.weight": np.zeros((4, 8), np.float32),
                   f"{stem}.lora_up.weight": np.zeros((8, 4), np.float32)}, str(lora))
        expected = "not a FLUX.1 LoRA"
    else:
        stem = "transformer.transformer_blocks.0.attn.to_q"
        save_file({f"{stem}.lora_A.weight": np.zeros((4, 99), np.float32),
                   f"{stem}.lora_B.weight": np.zeros((64, 4), np.float32)}, str(lora))
        expected = "shape"
    out = tmp_path / "out"
    code, _, err = run(["--model", "schnell", "--path", out, "--source", tiny_schnell, "--lora-paths", lora,
                        *extra], capsys)
    assert code in (1, 2) and expected in err and "Traceback" not in err
    assert not out.exists()
