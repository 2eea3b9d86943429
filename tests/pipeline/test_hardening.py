"""Issue #9 hardening of the pipeline: numbers checked at the boundary, memory estimate, invalid UTF-8,
staging whatever the flags, non-finite latents, true metadata, decode progress."""

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from flux_1 import Config, Flux1
from flux_1.pipeline import flux1
from flux_1.pipeline.metadata import a1111_parameters, read_png_metadata
from tests.cli.common import write_lora

SMALL = dict(num_inference_steps=1, height=32, width=48)
SAVED = Path(__file__).resolve().parents[1] / "fixtures" / "saved_v1"
BAD_PROMPT = b"a fox \xff\xfe".decode("utf-8", "surrogateescape")  # what argv gives for non-UTF-8 bytes


# -- Config and numbers --------------------------------------------------------------------------------


def test_config_accepts_integral_floats_and_refuses_other_types():
    config = Config(num_inference_steps=2.0, height=32.0, width=48)
    assert (config.num_inference_steps, config.height) == (2, 32)
    assert type(config.height) is int and type(config.num_inference_steps) is int
    for kwargs, match in [
        (dict(height=32.5), "height must be an integer, got 32.5"),
        (dict(width=True), "width must be an integer, got True"),
        (dict(width="64"), "width must be an integer, got '64'"),
        (dict(height=float("nan")), "height must be an integer"),
        (dict(num_inference_steps=False), "steps must be an integer"),
        (dict(guidance=float("nan")), "guidance must be a finite number, got nan"),
        (dict(guidance=float("inf")), "guidance must be a finite number, got inf"),
        (dict(guidance="3.5"), "guidance must be a number"),
        (dict(num_inference_steps=flux1.MAX_STEPS + 1), f"steps must be at most {flux1.MAX_STEPS}"),
        (dict(width=2**63), f"width must be at most {flux1.MAX_SIDE}"),
    ]:
        with pytest.raises(ValueError, match=match):
            Config(**kwargs)


def test_memory_estimate_refuses_what_cannot_fit():
    small = flux1.estimate_memory(1024, 1024, mx.bfloat16, on_gpu=True)
    assert 0.3 * 2**30 < small["transformer"] < 2 * 2**30  # 4608 tokens x 73728 values x 2 bytes
    flux1.check_size(1024, 1024, mx.bfloat16)
    with pytest.raises(ValueError, match=r"65536x65536 needs about [\d,.]+ GiB .* more than this machine"):
        flux1.check_size(65536, 65536, mx.float32)


def test_nan_lora_scales_are_refused_before_loading(tiny_schnell, tmp_path, monkeypatch):
    lora = write_lora(tmp_path / "style.safetensors")
    monkeypatch.setattr(flux1, "load_component", lambda *a, **k: pytest.fail("loaded a component"))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"LoRA scale #1 \(for .*style\.safetensors\) is (nan|inf): a strength "
                           "must be a finite number"):
            Flux1.from_alias("schnell", path=tiny_schnell, lora_paths=[str(lora)], lora_scales=[bad])


def test_set_lora_scales_refuses_nan(tiny_schnell, tmp_path):
    lora = write_lora(tmp_path / "style.safetensors")
    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", lora_paths=[str(lora)],
                            progress=False)
    with pytest.raises(ValueError, match="finite"):
        flux.set_lora_scales([float("nan")])


# -- prompts ---------------------------------------------------------------------------------------------


def test_invalid_utf8_prompt_is_refused_before_encoding(tiny_schnell, monkeypatch):
    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", progress=False)
    with pytest.raises(ValueError, match="not valid UTF-8 .*character 6"):
        flux.encode_prompt(BAD_PROMPT)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        flux.generate_image(seed=1, prompt=BAD_PROMPT, config=Config(**SMALL), progress=False)
    assert flux._transformer is None  # refused before anything else was loaded


# -- staging ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["schnell", "dev"])
@pytest.mark.parametrize("lora", [False, True], ids=["no-lora", "lora"])
@pytest.mark.parametrize("quantize", [None, 8])
def test_transformer_is_never_resident_with_the_text_encoders(tiny_flux, tmp_path, monkeypatch, alias, lora,
                                                               quantize):
    root = tiny_flux(alias)
    events = []
    original = Flux1._load

    def recording(self, component):
        others = {"t5": self.t5, "clip": self.clip, "transformer": self._transformer}
        events.append((component, {k for k, v in others.items() if v is not None}))
        return original(self, component)

    monkeypatch.setattr(Flux1, "_load", recording)
    paths = [str(write_lora(tmp_path / "style.safetensors", clip=True))] if lora else None
    flux = Flux1.from_alias(alias, path=root, precision="float32", quantize=quantize, lora_paths=paths,
                            progress=False)
    assert flux.is_guidance_distilled == (alias == "dev")  # decided without loading the transformer
    assert flux._transformer is None
    flux.generate_image(seed=1, prompt="a fox", config=Config(**SMALL, guidance=4.0), progress=False)
    flux.generate_image(seed=1, prompt="a new prompt", config=Config(**SMALL), progress=False)
    loads = [c for c, _ in events]
    assert loads == ["vae", "clip", "t5", "transformer", "clip", "t5", "transformer"]
    for component, resident in events:
        if component == "transformer":
            assert not resident & {"t5", "clip"}, events
        if component in ("t5", "clip"):
            assert "transformer" not in resident, events


def test_lora_staged_matches_resident_and_applies_its_clip_part(tiny_schnell, tmp_path):
    lora = str(write_lora(tmp_path / "style.safetensors", clip=True))
    images = {}
    for low_memory in (True, False):
        for paths in ([lora], None):
            flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", low_memory=low_memory,
                                    lora_paths=paths, progress=False)
            txt, pooled = flux.encode_prompt("a fox")
            image = flux.generate_image(seed=2, prompt="a fox", config=Config(**SMALL), progress=False)
            images[low_memory, bool(paths)] = (np.asarray(pooled), np.asarray(image.image))
    np.testing.assert_array_equal(images[True, True][1], images[False, True][1])
    np.testing.assert_array_equal(images[True, True][0], images[False, True][0])
    assert np.abs(images[True, True][0] - images[True, False][0]).max() > 0  # CLIP part applied


def test_bad_lora_is_refused_before_any_weight_loads(tiny_schnell, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    bad = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 4), np.float32)},
              str(bad))
    monkeypatch.setattr(flux1, "load_component", lambda *a, **k: pytest.fail("loaded a component"))
    with pytest.raises(ValueError, match="sdxl.safetensors"):
        Flux1.from_alias("schnell", path=tiny_schnell, lora_paths=[str(bad)], progress=False)


# -- non-finite latents -----------------------------------------------------------------------------------


def test_nan_latents_stop_with_the_step(tiny_schnell, monkeypatch):
    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", progress=False)
    real = flux1.sampler.euler_step
    calls = []

    def poisoned(x, v, s, s_next):
        calls.append(1)
        out = real(x, v, s, s_next)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(flux1.sampler, "euler_step", poisoned)
    with pytest.raises(flux1.NonFiniteError, match="the latents became NaN at step 2 of 3"):
        flux.generate_image(seed=1, prompt="a fox", config=Config(3, 32, 48), progress=False)
    bad = np.full((1, 6, 64), np.inf, np.float32)
    with pytest.raises(ValueError, match="given latents hold NaN or infinite"):
        flux.generate_image(seed=1, prompt="a fox", config=Config(**SMALL), latents=bad, progress=False)


# -- metadata -------------------------------------------------------------------------------------------


def test_given_latents_record_no_seed(tiny_schnell, tmp_path):
    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", progress=False)
    latents = np.asarray(flux1.sampler.initial_noise(9, 32, 48))
    image = flux.generate_image(seed=9, prompt="a fox", config=Config(**SMALL), latents=latents, progress=False)
    meta = image.metadata()
    assert meta["seed"] is None and meta["latents"] == "given"
    assert "Seed:" not in a1111_parameters(meta)
    seeded = flux.generate_image(seed=9, prompt="a fox", config=Config(**SMALL), progress=False)
    assert seeded.metadata()["seed"] == 9 and "latents" not in seeded.metadata()
    np.testing.assert_array_equal(np.asarray(image.image), np.asarray(seeded.image))


def test_dev_alias_on_schnell_weights_warns_early_and_records_no_guidance(tiny_schnell, monkeypatch):
    with pytest.warns(UserWarning, match="schnell-like .* guidance is ignored"):
        flux = Flux1.from_alias("dev", path=tiny_schnell, precision="float32", progress=False)
    assert flux._transformer is None and not flux.is_guidance_distilled
    image = flux.generate_image(seed=1, prompt="a fox", config=Config(**SMALL, guidance=5.0), progress=False)
    meta = image.metadata()
    assert meta["model"] == "dev" and meta["guidance"] is None
    assert "Distilled CFG Scale" not in a1111_parameters(meta)


def test_baked_loras_of_a_saved_folder_are_recorded(tmp_path):
    root = Path(shutil.copytree(SAVED, tmp_path / "saved"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["loras"] = [{"path": "/x/fox_style.safetensors", "name": "fox_style.safetensors", "scale": 0.8}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    flux = Flux1.from_alias("schnell", path=root, precision="float32", progress=False)
    image = flux.generate_image(seed=1, prompt="a fox", config=Config(**SMALL), progress=False)
    path = image.save(tmp_path / "out.png")
    read = read_png_metadata(path)
    assert read["flux_1"]["loras"] == [{"name": "fox_style", "scale": 0.8, "baked": True}]
    assert 'Baked LoRAs: "fox_style: 0.8"' in read["parameters"]


# -- decoding -----------------------------------------------------------------------------------------------


def test_decode_progress_counts_every_strip_and_changes_nothing(tiny_schnell, monkeypatch):
    from flux_1.models import vae

    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", progress=False)
    tokens = flux1.sampler.initial_noise(4, 64, 48)
    plain = flux.decode(tokens, 64, 48)
    monkeypatch.setattr(vae, "STRIP_BYTES", 4096)  # force strips on the tiny VAE
    seen = []
    z = flux.vae.unscale_latents(flux1.sampler.unpack(tokens, 64, 48))
    out = flux.vae.decode(z, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] == len(seen)
    assert len(seen) > 10  # more strips than convs
    np.testing.assert_array_equal(np.asarray(flux.vae.decode(z)), np.asarray(out))
    np.testing.assert_array_equal(flux.decode(tokens, 64, 48, progress=True), plain)
    assert math.isfinite(float(out.sum()))
