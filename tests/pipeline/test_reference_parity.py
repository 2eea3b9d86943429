"""Parity with diffusers/transformers in float32 on the tiny checkpoints, through our real loaders.

The committed references (tests/reference/reference_outputs.npz) were made by
tests/reference/make_reference_outputs.py from the same fixture weights; when torch and diffusers are
installed, tests/fixtures/test_fixtures.py recomputes them live and checks that they still agree.
"""

import mlx.core as mx
import numpy as np
import pytest

from flux_1 import Config, Flux1
from flux_1.loading import folder
from flux_1.pipeline import sampler
from tests.helpers import rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def components(tiny_schnell, tiny_dev):
    load = lambda root, c: folder.load_folder_component(root, c, mx.float32)  # noqa: E731
    return {
        "t5": load(tiny_schnell, "t5"), "clip": load(tiny_schnell, "clip"), "vae": load(tiny_schnell, "vae"),
        "schnell": load(tiny_schnell, "transformer"), "dev": load(tiny_dev, "transformer"),
    }


def test_t5_hidden_states(components, reference):
    out = components["t5"](mx.array(reference["t5.input_ids"]))
    assert rel_err(np.array(out), reference["t5.last_hidden_state"]) <= TOL


def test_clip_hidden_states_and_pooled(components, reference):
    hidden, pooled = components["clip"](mx.array(reference["clip.input_ids"]))
    assert rel_err(np.array(hidden), reference["clip.last_hidden_state"]) <= TOL
    assert rel_err(np.array(pooled), reference["clip.pooler_output"]) <= TOL


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("size", ["48x80", "112x64"])
def test_transformer_output(components, reference, variant, size):
    key = f"transformer.{variant}.{size}"
    r = {name: mx.array(reference[f"{key}.{name}"]) for name in
         ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")}
    out = components[variant](r["hidden_states"], r["encoder_hidden_states"], r["pooled_projections"],
                              r["timestep"], r["img_ids"], r["txt_ids"],
                              guidance=mx.array(reference[f"{key}.guidance"]) if variant == "dev" else None)
    assert rel_err(np.array(out), reference[f"{key}.output"]) <= TOL


def test_vae_decode(components, reference):
    z = mx.array(reference["vae.decode.latents"].transpose(0, 2, 3, 1))
    out = np.array(components["vae"].decode(z)).transpose(0, 3, 1, 2)
    assert rel_err(out, reference["vae.decode.sample"]) <= TOL


def test_vae_encode(components, reference):
    mean, logvar = components["vae"].encode(mx.array(reference["vae.encode.image"].transpose(0, 2, 3, 1)))
    assert rel_err(np.array(mean).transpose(0, 3, 1, 2), reference["vae.encode.mean"]) <= TOL
    assert rel_err(np.array(logvar).transpose(0, 3, 1, 2), reference["vae.encode.logvar"]) <= TOL


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("case", ["1024x1024x4", "512x768x28", "256x256x1", "1360x768x50", "64x96x2"])
def test_sigmas(reference, variant, case):
    h, w, steps = map(int, case.split("x"))
    rows, cols = sampler.latent_grid(h, w)
    ours = sampler.schedule(steps, rows * cols, shift=variant == "dev")
    ref = reference[f"schedule.{variant}.{case}.sigmas"]
    assert rel_err(ours, ref) <= TOL
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.fixture(scope="module")
def pipelines(tiny_schnell, tiny_dev):
    return {v: Flux1.from_alias(v, path=root, precision="float32")
            for v, root in (("schnell", tiny_schnell), ("dev", tiny_dev))}


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_tokenization_matches_the_reference_pipeline(pipelines, reference, variant):
    flux, key = pipelines[variant], f"pipeline.{variant}"
    prompt = str(reference[f"{key}.prompt"])
    t5 = flux.t5_tokenizer(prompt, padding="max_length", max_length=flux.variant.max_sequence_length,
                           truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(t5, reference[f"{key}.t5_input_ids"])
    clip = flux.clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                               return_tensors="np").input_ids
    np.testing.assert_array_equal(clip, reference[f"{key}.clip_input_ids"])


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_whole_pipeline_with_fixed_latents(pipelines, reference, variant):
    """Same prompt (non-ASCII for schnell), same initial latents, non-square: within 2/255 per pixel."""
    flux, key = pipelines[variant], f"pipeline.{variant}"
    prompt = str(reference[f"{key}.prompt"])
    txt, pooled = flux.encode_prompt(prompt)
    assert rel_err(np.array(txt), reference[f"{key}.prompt_embeds"]) <= TOL
    assert rel_err(np.array(pooled), reference[f"{key}.pooled_prompt_embeds"]) <= TOL

    config = Config(num_inference_steps=int(reference[f"{key}.steps"]), height=int(reference[f"{key}.height"]),
                    width=int(reference[f"{key}.width"]), guidance=float(reference[f"{key}.guidance_scale"]))
    image = flux.generate_image(seed=0, prompt=prompt, config=config, latents=reference[f"{key}.latents"],
                                progress=False)
    ours = np.asarray(image.image).astype(np.int16)
    ref = reference[f"{key}.image_uint8"][0].astype(np.int16)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 2
