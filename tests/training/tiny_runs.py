"""Shared by the trainer tests: tiny image folders and the settings of a tiny training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, sizes=((64, 64), (64, 64), (128, 64)), seed: int = 0, captions: bool = True) -> Path:
    """Random smooth images (a colour gradient plus noise) named img0.png, ... with img0.txt, ... captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        base = rng.random(3) * 255
        ramp = np.linspace(0, 1, w)[None, :, None] * (rng.random(3) * 255 - base)
        pixels = base + ramp + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    return folder


def tiny_settings(data: Path, output: Path, model_path: Path, **overrides) -> dict:
    """TrainConfig keyword arguments for a fast run on a tiny checkpoint (64-pixel buckets)."""
    settings = dict(data=data, output=output, model="schnell", path=model_path, steps=4, resolution=64,
                    batch_size=1, grad_accum=1, learning_rate=1e-3, save_every=100, progress=False)
    settings.update(overrides)
    return settings
