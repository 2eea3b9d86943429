"""Exported LoRA files: the PEFT layout loads in diffusers' FluxPipeline with no missing/unexpected key
and gives our live output; our own loader reads both layouts back to the same model; writes are atomic."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from flux_1.loading import folder
from flux_1.lora import apply_loras, load_lora
from flux_1.training import AdapterConfig, attach, save_lora, target_modules
from tests.helpers import rel_err

from .common import batch, ours_prediction, randomize_ups

CONFIG = AdapterConfig(rank=3, alpha=5.0, targets="attention")  # scale 5/3: a wrong scale shows


@pytest.fixture(scope="module")
def trained(tiny_dev):
    """The tiny dev transformer with adapters on every block linear, non-zero factors."""
    t = folder.load_folder_component(tiny_dev, "transformer", mx.float32)
    attach(t, AdapterConfig(rank=3, alpha=5.0, targets="all"), seed=1)
    randomize_ups(t, std=0.2)
    return t


@pytest.fixture(scope="module")
def trained_attention(tiny_dev):
    t = folder.load_folder_component(tiny_dev, "transformer", mx.float32)
    attach(t, CONFIG, seed=2)
    randomize_ups(t, std=0.2)
    return t


def header(path: Path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), "np") as f:
        return list(f.keys()), f.metadata()


def test_peft_layout_keys_and_metadata(trained_attention, tmp_path):
    path = save_lora(trained_attention, tmp_path / "lora.safetensors", CONFIG, metadata={"run": {"steps": 3}})
    keys, meta = header(path)
    names = target_modules(trained_attention, "attention")
    assert sorted(keys) == sorted(f"transformer.{n}.lora_{f}.weight" for n in names for f in "AB")
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 3 and config["transformer.lora_alpha"] == 5.0
    assert config["transformer.target_modules"] == sorted(names)
    assert meta["format"] == "pt" and json.loads(meta["run"]) == {"steps": 3}


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("which", ["all", "attention"])
def test_our_loader_reads_the_file_back_exactly(tiny_dev, trained, trained_attention, tmp_path, fmt, which):
    live, config = (trained, AdapterConfig(rank=3, alpha=5.0, targets="all")) if which == "all" else (
        trained_attention, CONFIG)
    path = save_lora(live, tmp_path / f"{fmt}.safetensors", config, format=fmt)
    lora = load_lora(path)
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in lora.tensors)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora.tensors
    fresh = folder.load_folder_component(tiny_dev, "transformer", mx.float32)
    b = batch(fresh.params, seed=5)
    plain = ours_prediction(fresh, b)
    stack = apply_loras(fresh, [lora])
    (entry,) = stack.entries.values()
    assert not entry.report.skipped and entry.report.matched == entry.report.total
    expected = ours_prediction(live, b)
    assert rel_err(expected, plain) > 1e-3  # the adapters change the output
    assert rel_err(ours_prediction(fresh, b), expected) <= 1e-5


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_diffusers_loads_the_peft_file_cleanly_and_matches(tiny_dev, trained, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from .common import torch_prediction

    path = save_lora(trained, tmp_path / "lora.safetensors", AdapterConfig(rank=3, alpha=5.0, targets="all"))
    # The transformer is all a transformer LoRA touches: the text encoders and the VAE are left out.
    none = dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"))
    pipe = diffusers.FluxPipeline.from_pretrained(tiny_dev, torch_dtype=torch.float32, **none)
    records = Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    # diffusers says this of every transformer-only LoRA (its own dreambooth outputs too): no CLIP keys.
    benign = "No LoRA keys associated to NoneType found with the prefix='text_encoder'"
    problems = [m for m in records.messages if benign not in m]
    problems += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert not problems, problems
    b = batch(trained.params, seed=6)
    with torch.no_grad():
        _, theirs = torch_prediction(pipe.transformer, b, torch)
    assert rel_err(ours_prediction(trained, b), theirs.numpy()) <= 1e-4


@pytest.mark.parametrize("targets", ["all", "attention"])
def test_diffusers_reads_the_kohya_file_as_the_same_projections(tmp_path, targets):
    """diffusers' kohya converter (FLUX.1's real sizes are written into it, so: a full-size model whose
    base weights are never evaluated) turns our kohya file into the very per-projection deltas."""
    pytest.importorskip("torch")
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    from flux_1.models.transformer import FluxParams, FluxTransformer
    from flux_1.training.adapters import peft_factors

    t = FluxTransformer(FluxParams(guidance_embed=True))
    config = AdapterConfig(rank=2, alpha=3.0, targets=targets)
    attach(t, config)
    randomize_ups(t, std=0.2)
    path = save_lora(t, tmp_path / "kohya.safetensors", config, format="kohya")
    with safe_open(str(path), "pt") as f:
        converted = conversion._convert_kohya_flux_lora_to_diffusers({k: f.get_tensor(k) for k in f.keys()})
    ours = peft_factors(t)
    rng = np.random.default_rng(0)
    for name, (a, b, scale) in ours.items():
        v = rng.standard_normal(a.shape[1]).astype(np.float32)
        theirs_a, theirs_b = (converted[f"transformer.{name}.lora_{f}.weight"].double().numpy() for f in "AB")
        expected = scale * (np.array(b, np.float64) @ (np.array(a, np.float64) @ v))
        assert rel_err(theirs_b @ (theirs_a @ v), expected) <= 1e-5, name
    projections = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert projections == {f"transformer.{n}" for n in ours} | (
        set() if targets == "all" else {f"transformer.single_transformer_blocks.{i}.proj_mlp" for i in range(38)})


def test_a_failed_write_keeps_the_old_file(trained_attention, tmp_path, monkeypatch):
    path = save_lora(trained_attention, tmp_path / "lora.safetensors", CONFIG)
    old = path.read_bytes()

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_lora(trained_attention, path, CONFIG, format="kohya")
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_refusals_are_one_clear_error(tiny_dev, trained_attention, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA format 'comfy'; choose one of peft, kohya"):
        save_lora(trained_attention, tmp_path / "x.safetensors", CONFIG, format="comfy")
    with pytest.raises(ValueError, match="rank 3, scale 1.66667; the config says rank 4, alpha 5"):
        save_lora(trained_attention, tmp_path / "x.safetensors", AdapterConfig(rank=4, alpha=5.0))
    with pytest.raises(ValueError, match="metadata key 'format' is written by save_lora"):
        save_lora(trained_attention, tmp_path / "x.safetensors", CONFIG, metadata={"format": "x"})
    with pytest.raises(ValueError, match="is a folder"):
        save_lora(trained_attention, tmp_path, CONFIG)
    plain = folder.load_folder_component(tiny_dev, "transformer", mx.float32)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_lora(plain, tmp_path / "x.safetensors", CONFIG)
    assert not list(tmp_path.glob("x*"))
