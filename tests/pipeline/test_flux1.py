"""Flux1 behaviour beyond parity: staged memory, prompt cache, reproducible noise, input checks."""

import numpy as np
import pytest

from flux_1 import Config, Flux1
from flux_1.loading.weights import WeightLoadError

SMALL = dict(num_inference_steps=1, height=32, width=48)


@pytest.fixture(scope="module")
def staged(tiny_schnell):
    return Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", low_memory=True)


def test_low_memory_releases_text_encoders_and_reloads_for_a_new_prompt(staged):
    first = staged.generate_image(seed=3, prompt="a red fox", config=Config(**SMALL), progress=False)
    assert staged.t5 is None and staged.clip is None  # freed before denoising
    again = staged.generate_image(seed=3, prompt="a red fox", config=Config(**SMALL), progress=False)
    assert staged.t5 is None  # same prompt: cached encoding, no reload
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(again.image))
    staged.generate_image(seed=3, prompt="a blue bird", config=Config(**SMALL), progress=False)
    assert staged.t5 is None  # reloaded to encode, then freed again


def test_low_memory_never_holds_text_encoders_and_transformer_together(tiny_schnell):
    flux = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", low_memory=True)
    assert flux._transformer is None and flux.t5 is not None
    flux.encode_prompt("a red fox")
    assert flux._transformer is None and flux.t5 is None and flux.clip is None
    flux.generate_image(seed=1, prompt="a red fox", config=Config(**SMALL), progress=False)
    assert flux._transformer is not None and flux.t5 is None


def test_seed_alone_gives_reproducible_and_distinct_images(staged):
    a, b, c = (np.asarray(staged.generate_image(seed=s, prompt="a red fox", config=Config(**SMALL),
                                                progress=False).image) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_low_memory_matches_resident_encoders(staged, tiny_schnell):
    resident = Flux1.from_alias("schnell", path=tiny_schnell, precision="float32", low_memory=False)
    a = staged.generate_image(seed=5, prompt="a cabin", config=Config(**SMALL), progress=False)
    b = resident.generate_image(seed=5, prompt="a cabin", config=Config(**SMALL), progress=False)
    assert resident.t5 is not None
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(staged, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        staged.generate_image(seed=1, prompt=prompt, config=Config(**SMALL))


def test_latents_of_the_wrong_shape_are_refused(staged):
    with pytest.raises(ValueError, match=r"latents have shape \(1, 5, 64\), expected \(1, 6, 64\) for 48x32"):
        staged.generate_image(seed=1, prompt="x", config=Config(**SMALL), latents=np.zeros((1, 5, 64), np.float32))


def test_config_checks_and_rounding():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Config(num_inference_steps=0)
    with pytest.raises(ValueError, match="width must be at least 16"):
        Config(width=8)
    with pytest.warns(UserWarning, match="height 40 is not a multiple of 16: using 32"):
        assert Config(height=40).height == 32


def test_unknown_alias_and_precision(tiny_schnell):
    with pytest.raises(ValueError, match="unknown model 'pro'"):
        Flux1.from_alias("pro", path=tiny_schnell)
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        Flux1.from_alias("schnell", path=tiny_schnell, precision="int8")


def test_missing_tokenizer_is_named(tiny_flux, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_flux("schnell", bfl=False), copy)
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(WeightLoadError, match="missing component folder tokenizer_2/"):
        Flux1.from_alias("schnell", path=copy, precision="float32")


def test_dev_weights_under_the_schnell_alias_warn(tiny_dev):
    with pytest.warns(UserWarning, match="guidance-distilled"):
        Flux1.from_alias("schnell", path=tiny_dev, precision="float32")
