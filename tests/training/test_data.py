"""training/data.py: discovery and captions, buckets, pixels, the cache and the data order (no model)."""

from __future__ import annotations

import json
import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from flux_1.training import data
from tests.training.tiny_runs import write_images


def test_txt_captions_and_trigger(tmp_path):
    folder = write_images(tmp_path / "d")
    examples = data.discover(folder, trigger="TOK")
    assert [e.path.name for e in examples] == ["img0.png", "img1.png", "img2.png"]
    assert [e.caption for e in examples] == [f"TOK, a photo of thing {i}" for i in range(3)]
    assert examples[2].size == (128, 64) and len(examples[0].sha256) == 64
    assert data.with_trigger("TOK, already", "TOK") == "TOK, already"


def test_metadata_jsonl_wins_and_caption_fills_the_rest(tmp_path):
    folder = write_images(tmp_path / "d", captions=False)
    rows = [{"file_name": "img0.png", "text": "from metadata"}, {"file_name": "gone.png", "text": "x"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match="gone.png does not exist"):
        examples = data.discover(folder, caption="instance prompt")
    assert [e.caption for e in examples] == ["from metadata", "instance prompt", "instance prompt"]


def test_bad_metadata_line_is_named(tmp_path):
    folder = write_images(tmp_path / "d", captions=False)
    (folder / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "a"}\nnot json\n')
    with pytest.raises(data.DataError, match=r"metadata.jsonl line 2 is not JSON"):
        data.discover(folder)


def test_uncaptioned_images_are_named(tmp_path):
    folder = write_images(tmp_path / "d", captions=False)
    with pytest.raises(data.DataError, match=r"no caption for img0.png, img1.png, img2.png .*--caption"):
        data.discover(folder)


def test_buckets():
    assert data.bucket_sizes(64) == [(64, 64)]
    sizes = data.bucket_sizes(512)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and max(w, h) / min(w, h) <= 4
        assert abs(w * h / (512 * 512) - 1) <= 0.1  # close to the requested area
    assert data.nearest_bucket((1600, 900), sizes) == (704, 384)  # 16:9 -> 1.83
    assert data.nearest_bucket((900, 1600), sizes) == (384, 704)
    with pytest.raises(data.DataError, match="multiple of 64"):
        data.bucket_sizes(100)


def test_fit_resizes_to_cover_and_centre_crops():
    left_red_right_blue = np.zeros((64, 192, 3), np.uint8)
    left_red_right_blue[:, :64, 0] = 255
    left_red_right_blue[:, 128:, 2] = 255
    out = data.fit(Image.fromarray(left_red_right_blue), (64, 64))
    assert out.size == (64, 64)
    assert np.asarray(out).max() < 30  # only the black middle third is left
    wide = data.fit(Image.fromarray(left_red_right_blue), (128, 64))  # 3:1 into 2:1: resized to 192x64, cropped
    assert wide.size == (128, 64)


def test_pixels_and_flip():
    image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    x = np.array(data.pixels(image))
    assert x.shape == (1, 1, 2, 3) and x[0, 0, 0, 0] == -1 and x[0, 0, 1, 0] == 1
    assert np.array_equal(np.array(data.pixels(image, flip=True)), x[:, :, ::-1])


def test_samples_flip_and_upscale_warning(tmp_path):
    folder = write_images(tmp_path / "d", sizes=((40, 40), (64, 64)))
    examples = data.discover(folder)
    with pytest.warns(UserWarning, match=r"img0.png is 40x40, smaller than its 64x64 bucket: upscaled"):
        samples = data.make_samples(examples, 64, flip=True, model_key="m")
    assert [(s.example.path.name, s.flip) for s in samples] == [
        ("img0.png", False), ("img0.png", True), ("img1.png", False), ("img1.png", True)]
    assert len({s.latent_key for s in samples}) == 4 and samples[0].prompt_key == samples[1].prompt_key
    again = data.make_samples(examples[1:], 64, flip=False, model_key="m")
    assert again[0].latent_key == samples[2].latent_key
    other_model = data.make_samples(examples[1:], 64, flip=False, model_key="n")
    assert other_model[0].latent_key != samples[2].latent_key
    assert other_model[0].prompt_key != samples[2].prompt_key


def _fake_encoders(calls):
    def encode_image(x):
        calls.append("image")
        return mx.mean(x, axis=-1, keepdims=True)[:, ::8, ::8] * mx.ones((16,))

    def encode_text(caption):
        calls.append(caption)
        return mx.full((1, 3, 4), float(len(caption))), mx.full((1, 5), 1.0)

    return encode_image, encode_text


def test_cache_fills_once_and_follows_changes(tmp_path):
    folder = write_images(tmp_path / "d")
    samples = data.make_samples(data.discover(folder), 64, flip=False, model_key="m")
    cache = data.Cache(tmp_path / "cache")
    calls = []
    assert cache.fill(samples, *_fake_encoders(calls)) == 6  # 3 latents, 3 captions
    assert cache.fill(samples, *_fake_encoders(calls)) == 0
    assert len(calls) == 6
    (folder / "img1.txt").write_text("a new caption")
    samples = data.make_samples(data.discover(folder), 64, flip=False, model_key="m")
    assert cache.fill(samples, *_fake_encoders(calls)) == 1 and calls[-1] == "a new caption"
    latents, txt, pooled = cache.load_batch(samples)  # at 64 pixels every image is in the 64x64 bucket
    assert latents.shape == (3, 8, 8, 16) and txt.shape == (3, 3, 4) and pooled.shape == (3, 5)
    assert txt[1, 0, 0].item() == len("a new caption")
    assert not [p for p in (tmp_path / "cache").rglob(".*")]  # no temporary file left


def test_order_is_seeded_bucketed_and_complete(tmp_path):
    folder = write_images(tmp_path / "d", sizes=((128, 128),) * 5 + ((256, 64),) * 3)
    samples = data.make_samples(data.discover(folder), 128, flip=False, model_key="m")
    buckets = {s.bucket for s in samples}
    assert len(buckets) == 2
    order = data.DataOrder(samples, global_batch=2, seed=3)
    assert order.batches_per_epoch == math.ceil(5 / 2) + math.ceil(3 / 2)
    for epoch in range(3):
        batches = order.epoch(epoch)
        assert all(len(b) == 2 and len({samples[i].bucket for i in b}) == 1 for b in batches)
        assert set().union(*batches) == set(range(len(samples)))
    first = [order.batch(m) for m in range(10)]
    assert [data.DataOrder(samples, 2, seed=3).batch(m) for m in range(10)] == first  # a pure function
    assert [data.DataOrder(samples, 2, seed=4).batch(m) for m in range(10)] != first
    assert order.epoch(0) != order.epoch(1)


def test_bucket_smaller_than_a_batch_is_repeated(tmp_path):
    folder = write_images(tmp_path / "d", sizes=((64, 64),))
    samples = data.make_samples(data.discover(folder), 64, flip=True, model_key="m")
    order = data.DataOrder(samples, global_batch=3, seed=0)
    assert order.batches_per_epoch == 1 and sorted(set(order.batch(0))) == [0, 1] and len(order.batch(0)) == 3


def test_unreadable_image_is_skipped_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "d")
    (folder / "img1.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = data.discover(folder)
    assert [e.path.name for e in examples] == ["img0.png", "img2.png"]
    assert any("img1.png is not readable" in str(w.message) for w in caught)
