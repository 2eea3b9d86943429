"""Image-conditioned generation: the pieces checked against diffusers' own functions (no reference files),
and behaviour (strength 0 is text to image, bad inputs are named)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

from flux_1 import Config, Flux1
from flux_1.pipeline import conditioning as cond
from flux_1.pipeline import sampler
from flux_1.pipeline.flux1 import check_request, conditioning_of
from flux_1.pipeline.variants import VARIANTS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:40, :60]).save(tmp_path / "mask_small.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


# -- against diffusers' functions ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 25, 28, 50])
@pytest.mark.parametrize("image_strength", [0.0, 0.05, 0.1, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9, 0.95, 0.99])
def test_start_step_and_sigma_match_diffusers_get_timesteps(steps, image_strength):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    n = 12  # image tokens: a 48x64 image
    mu = sampler.resolution_mu(n)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    pipe = type("P", (), {"scheduler": scheduler})()
    timesteps, remaining = FluxImg2ImgPipeline.get_timesteps(pipe, steps, 1 - image_strength, "cpu")
    skip = cond.start_step(steps, image_strength)
    assert skip == steps - remaining
    if remaining:
        sigmas = sampler.schedule(steps, n, shift=True)
        np.testing.assert_allclose(sigmas[skip:], scheduler.sigmas.numpy()[skip:], rtol=0, atol=1e-6)
        assert float(sigmas[skip]) * 1000 == pytest.approx(float(timesteps[0]), abs=1e-3)


def test_noised_is_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    rng = np.random.default_rng(1)
    image, noise = rng.standard_normal((2, 1, 6, 64)).astype(np.float32)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.7)
    scheduler.set_begin_index(2)
    sigma = float(scheduler.sigmas[2])
    want = scheduler.scale_noise(torch.from_numpy(image), scheduler.timesteps[2:3], torch.from_numpy(noise))
    got = cond.noised(mx.array(image), mx.array(noise), sigma)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_kontext_sizes_match_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert tuple(map(tuple, PREFERRED_KONTEXT_RESOLUTIONS)) == cond.PREFERRED_KONTEXT_RESOLUTIONS
    for w, h in [(70, 50), (1024, 1024), (1000, 1500), (1920, 1080), (517, 389), (33, 400), (4000, 100)]:
        iw, ih = w - w % 16, h - h % 16  # get_default_height_width with vae_scale_factor 16
        _, ew, eh = min((abs(iw / ih - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert cond.kontext_size(w, h) == (ew // 16 * 16, eh // 16 * 16)
        assert cond.kontext_size(w, h, auto_resize=False) == (iw, ih)


@pytest.mark.parametrize("size", [(80, 64), (64, 48), (96, 32)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_and_mask_preprocessing_match_load_image_and_vae_image_processor(tmp_path, size, mode):
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    rng = np.random.default_rng(2)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (50, 70, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(tmp_path / "x.png")
    image = load_image(str(tmp_path / "x.png"))
    ours = cond.read_image(tmp_path / "x.png", "image").image
    w, h = size
    want = VaeImageProcessor(vae_scale_factor=16).preprocess(image, height=h, width=w)
    np.testing.assert_array_equal(np.asarray(cond.image_pixels(ours, w, h)), want.permute(0, 2, 3, 1).numpy())
    masks = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    want = masks.preprocess(image, height=h, width=w)
    np.testing.assert_array_equal(np.asarray(cond.mask_pixels(ours, w, h)), want[0, 0].numpy())


def test_fill_conditioning_matches_prepare_mask_latents():
    from diffusers import FluxFillPipeline, FluxPipeline

    rng = np.random.default_rng(3)
    H, W = 48, 64
    mask = (rng.random((H, W)) > 0.5).astype(np.float32)
    latents = rng.standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)
    shift, scale = 0.1159, 0.3611
    fake = type("P", (), {"vae_scale_factor": 8, "_pack_latents": staticmethod(FluxPipeline._pack_latents),
                          "vae": type("V", (), {"config": type("C", (), {"shift_factor": shift,
                                                                         "scaling_factor": scale})})})()
    want_mask, want_latents = FluxFillPipeline.prepare_mask_latents(
        fake, torch.from_numpy(mask)[None, None], torch.from_numpy(latents), 1, 16, 1, H, W, torch.float32,
        "cpu", None)
    np.testing.assert_array_equal(np.asarray(cond.pack_mask(mx.array(mask))), want_mask.numpy())
    scaled = (mx.array(latents.transpose(0, 2, 3, 1)) - shift) * scale
    np.testing.assert_allclose(np.asarray(sampler.pack(scaled)), want_latents.numpy(), rtol=0, atol=1e-6)


def test_pack_is_diffusers_pack_and_inverts_unpack():
    from diffusers import FluxPipeline

    x = np.random.default_rng(4).standard_normal((1, 16, 6, 8)).astype(np.float32)
    want = FluxPipeline._pack_latents(torch.from_numpy(x), 1, 16, 6, 8).numpy()
    packed = sampler.pack(mx.array(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(packed), want)
    np.testing.assert_array_equal(np.asarray(sampler.unpack(packed, 48, 64)), x.transpose(0, 2, 3, 1))


def test_kontext_reference_ids_have_first_axis_one():
    from diffusers import FluxKontextPipeline

    want = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    want[..., 0] = 1
    np.testing.assert_array_equal(np.asarray(cond.reference_ids(48, 64)), want.numpy())


# -- behaviour -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev(tiny_dev):
    return Flux1.from_alias("dev", path=tiny_dev, precision="float32", progress=False)


def test_image_strength_zero_is_text_to_image(dev, files):
    noise = np.random.default_rng(5).standard_normal((1, 12, 64)).astype(np.float32)
    size = dict(num_inference_steps=3, height=48, width=64)
    a = dev.generate_image(None, "a fox", Config(**size, image_path=files / "in.png", image_strength=0.0),
                           latents=noise, progress=False)
    b = dev.generate_image(None, "a fox", Config(**size), latents=noise, progress=False)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.mode == "img2img" and a.metadata()["inputs"]["image"]["file"] == "in.png"


def test_img2img_default_size_strength_and_metadata(dev, files):
    image = dev.generate_image(1, "a fox", Config(num_inference_steps=4, image_path=files / "in.png",
                                                  image_strength=0.5), progress=False)
    assert image.image.size == (64, 48)  # 70x50 rounded down to multiples of 16
    meta = image.metadata()
    assert meta["image_strength"] == 0.5 and len(meta["inputs"]["image"]["sha256"]) == 64
    from flux_1.pipeline.metadata import a1111_parameters

    assert "Denoising strength: 0.5" in a1111_parameters(meta)


def test_control_lora_width_turns_dev_into_control(tiny_dev, files):
    flux = Flux1.from_alias("dev", path=tiny_dev, precision="float32", progress=False, low_memory=False)
    hidden = flux.transformer.img_in.weight.shape[0]
    flux.transformer.img_in = nn.Linear(128, hidden)  # as a control LoRA widens it
    assert flux.conditioning == "control"
    with pytest.raises(ValueError, match="needs a control image"):
        flux.generate_image(1, "x", Config(num_inference_steps=1), progress=False)
    image = flux.generate_image(1, "x", Config(num_inference_steps=1, control_image_path=files / "in.png"),
                                progress=False)
    assert image.mode == "control" and image.image.size == (64, 48)


@pytest.mark.parametrize("alias, fields, message", [
    ("dev", dict(mask_path="m.png"), "'dev' takes no mask_path"),
    ("schnell", dict(control_image_path="c.png"), "'schnell' takes no control_image_path"),
    ("dev-canny", dict(image_path="i.png", control_image_path="c.png"), "give it as control_image_path"),
    ("dev-kontext", {}, "needs an input image"),
    ("dev-fill", dict(image_path="i.png"), "needs a mask"),
    ("dev-depth", {}, "needs a control image"),
    ("dev-kontext", dict(image_path="i.png", image_strength=0.3), "takes no image_strength"),
    ("dev", dict(auto_resize=False), "takes no auto_resize=False"),
])
def test_requests_a_model_cannot_take_are_named(alias, fields, message):
    v = VARIANTS[alias]
    with pytest.raises(ValueError, match=message):
        check_request(Config(**fields), v, v.conditioning)


def test_config_checks_image_strength_and_outpaint():
    with pytest.raises(ValueError, match=r"image_strength must be in \[0, 1\)"):
        Config(image_path="x.png", image_strength=1.0)
    with pytest.raises(ValueError, match="without an image"):
        Config(image_strength=0.3)
    with pytest.raises(ValueError, match="outpaint must be 4 pixel counts"):
        Config(outpaint=(1, 2, 3))
    assert Config().height is None and Config().guidance is None


def test_checkpoint_of_another_layout_is_refused():
    with pytest.raises(ValueError, match="takes 64 input channels .* 'dev-fill' needs 384"):
        conditioning_of(VARIANTS["dev-fill"], 64)
    assert conditioning_of(VARIANTS["dev"], 128) == "control"


def test_bad_files_are_named(dev, files):
    for path, message in [(files / "nope.png", "does not exist"), (files / "broken.png", "not a readable image"),
                          (files, "is not a file")]:
        with pytest.raises(ValueError, match=f"image {path}.*{message}"):
            dev.generate_image(1, "x", Config(num_inference_steps=1, image_path=path), progress=False)
