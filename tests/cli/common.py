"""Helpers shared by the CLI tests."""

from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

HIDDEN, MLP = 64, 256  # the tiny transformer (tests/fixtures/make_tiny_checkpoints.py)
CLIP_HIDDEN = 64


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """Run a console-script `main(argv)` in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_refused(result: tuple[int, str, str], expected: list[str], tmp_path) -> None:
    """A clean refusal: non-zero exit, every expected text in stderr, no traceback, no image written."""
    code, stdout, stderr = result
    assert code not in (0, None)
    for text in expected:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert "Traceback" not in stderr and "Saved" not in stdout
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.png"))


def write_lora(path: Path, seed: int = 0, rank: int = 4, std: float = 0.4, clip: bool = False) -> Path:
    """A diffusers/PEFT-format LoRA for the tiny transformer (double block 0 attention, single block 0 MLP),
    with deltas large enough to change the pixels; `clip` adds one CLIP attention projection."""
    rng = np.random.default_rng(seed)
    tensors = {}

    def pair(stem: str, out: int, inp: int):
        tensors[f"{stem}.lora_A.weight"] = (std * rng.standard_normal((rank, inp))).astype(np.float32)
        tensors[f"{stem}.lora_B.weight"] = (std * rng.standard_normal((out, rank))).astype(np.float32)

    for part in ("to_q", "to_k", "to_v"):
        pair(f"transformer.transformer_blocks.0.attn.{part}", HIDDEN, HIDDEN)
    pair("transformer.transformer_blocks.0.attn.to_out.0", HIDDEN, HIDDEN)
    pair("transformer.single_transformer_blocks.0.proj_mlp", MLP, HIDDEN)
    if clip:
        pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", CLIP_HIDDEN, CLIP_HIDDEN)
    save_file(tensors, str(path))
    return path
