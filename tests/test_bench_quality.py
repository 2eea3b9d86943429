"""bench/quality.py (SSIM / PSNR of candidate models against a reference) and bench/gguf_speed.py, on the
tiny checkpoint: the reference against itself, `-q 8`, `-q 4` and a Q8_0 GGUF written from the same weights."""

from __future__ import annotations

import json

import pytest

from bench import gguf_speed, quality

PROMPT = "a red fox in the snow"


def test_candidate_flags_are_the_generate_flags(tiny_schnell):
    args = quality.parse_args(["--model", "schnell", "--path", str(tiny_schnell), "--prompts", PROMPT,
                               "--candidate", "q8:-q 8",
                               "--candidate", "g:--transformer-gguf f.gguf --precision bfloat16",
                               "--candidate", "same:"])
    assert args.reference["path"] == tiny_schnell and args.reference["quantize"] is None
    q8, g, same = args.candidates
    assert q8["label"] == "q8" and q8["kwargs"]["quantize"] == 8 and q8["kwargs"]["path"] == tiny_schnell
    assert str(g["kwargs"]["transformer_gguf"]) == "f.gguf" and g["kwargs"]["precision"] == "bfloat16"
    assert same["kwargs"] == args.reference


@pytest.mark.parametrize("candidate, message", [
    ("-q 8", "LABEL:FLAGS"),
    ("q3:-q 3 --steps 2", "--steps is not a model flag"),
    ("q7:-q 7", "bad flags"),
    ("x:--nope 1", "unknown flag"),
    ("reference:-q 8", "used twice"),
])
def test_bad_candidates_are_refused(tiny_schnell, capsys, candidate, message):
    with pytest.raises(SystemExit):
        quality.parse_args(["--model", "schnell", "--path", str(tiny_schnell), "--prompts", PROMPT,
                            "--candidate", candidate])
    assert message in capsys.readouterr().err


def test_quality_tiny(tiny_schnell, tmp_path):
    pytest.importorskip("skimage")
    gguf = tmp_path / "tiny-Q8_0.gguf"  # quantized from the tiny checkpoint's own weights (gguf.quants)
    with gguf_speed.extra_profiles() as mk:
        types = mk.write_transformer_gguf(tiny_schnell / "flux1-schnell.safetensors", gguf, "q8_0")
    assert "q8_0" not in mk.PROFILES
    assert "Q8_0" in types.values()
    out = tmp_path / "out"
    report = quality.main(["--model", "schnell", "--path", str(tiny_schnell), "--prompts", PROMPT,
                           "--seeds", "1", "2", "--steps", "2", "--width", "64", "--height", "64",
                           "--candidate", "same:", "--candidate", "q8:-q 8", "--candidate", "q4:-q 4",
                           "--candidate", f"gguf-q8_0:--transformer-gguf {gguf}", "--output-dir", str(out)])
    c = {r["label"]: r for r in report["candidates"]}
    # The same model, the same latents: identical images (SSIM exactly 1, PSNR infinite).
    assert c["same"]["mean_ssim"] == 1.0 and c["same"]["identical_images"] == 2 and c["same"]["mean_psnr_db"] is None
    assert 0.9 < c["q4"]["mean_ssim"] < c["q8"]["mean_ssim"] < 1.0
    assert c["q8"]["mean_psnr_db"] > c["q4"]["mean_psnr_db"]
    assert c["gguf-q8_0"]["mean_ssim"] > c["q4"]["mean_ssim"]
    assert c["gguf-q8_0"]["gguf_files"] == {"transformer": str(gguf)}
    assert len(c["q8"]["images"]) == 2
    for name in ("quality.json", "quality.md", "grid.png", "reference/p0_seed1.png", "q4/p0_seed2.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "quality.json").read_text())["candidates"][1]["label"] == "q8"
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.width == 5 * 64 and grid.height > 2 * 64  # reference + 4 candidates per row, 2 rows
    assert "| q4 | `-q 4` |" in (out / "quality.md").read_text()


def test_gguf_speed_tiny(tmp_path):
    pytest.importorskip("gguf")
    report = gguf_speed.main(["--config", "tiny", "--steps", "1", "--warmup", "0",
                              "--weights-dir", str(tmp_path / "w"), "--gguf-dir", str(tmp_path / "g"),
                              "--output-json", str(tmp_path / "speed.json"), "--markdown", str(tmp_path / "speed.md")])
    rows = {r["setting"]: r for r in report["rows"]}
    assert set(rows) == set(gguf_speed.SETTINGS)
    assert all(r["finite"] and r["step_s"] > 0 for r in rows.values())
    assert "8-bit g32" in rows["gguf-q8_0"]["linears"] and "4-bit g32" in rows["gguf-q4k"]["linears"]
    assert rows["gguf-q4k"]["gguf_types"]["Q4_K"] > 0
    assert "8-bit g64" in rows["q8"]["linears"]
    assert (tmp_path / "speed.md").read_text().count("\n|") >= 6


def test_gguf_from_folder_holds_the_folders_weights(tiny_schnell, tmp_path):
    """bench.gguf_speed --convert: a Q8_0 GGUF of a folder's own transformer, which loads back to within Q8_0's
    rounding of the folder's weights (so bench.quality can compare it with the folder)."""
    pytest.importorskip("gguf")
    import mlx.core as mx

    from flux_1.loading import folder as loader
    from flux_1.loading.gguf import load_gguf_component

    out = tmp_path / "conv.gguf"
    types = gguf_speed.main(["--convert", str(tiny_schnell), str(out)])
    assert types["Q8_0"] > 0 and set(types) <= {"Q8_0", "F16", "F32"}
    a = load_gguf_component(out, "transformer", mx.float32)
    b = loader.load_folder_component(tiny_schnell, "transformer", mx.float32)
    m, ref = a.single_blocks[0].linear1, b.single_blocks[0].linear1.weight
    w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
    assert (m.bits, m.group_size) == (8, 32)
    assert float(mx.abs(w - ref).max()) <= float(mx.abs(ref).max()) / 127 * 0.51 + 1e-6  # half a Q8_0 step
    assert mx.array_equal(a.single_blocks[0].norm.query_norm.weight, b.single_blocks[0].norm.query_norm.weight)
