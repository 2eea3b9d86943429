"""bench/cpu_speed.py (issue #14's A/B experiments) and the step buffer cache the pipeline and bench share."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from bench import cpu_speed
from flux_1.pipeline.flux1 import StepBufferCache


def test_alternate_interleaves_variants_and_skips_warmup():
    order = []
    out = cpu_speed.alternate({"a": lambda: order.append("a") or mx.zeros(1),
                               "b": lambda: order.append("b") or mx.zeros(1)}, rounds=2, warmup=1)
    assert order == ["a", "b"] * 3  # in turn each round, the warm-up round included
    assert set(out) == {"a", "b"} and all(len(v["all_s"]) == 2 for v in out.values())
    assert all(v["min_s"] <= v["median_s"] for v in out.values())


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def test_step_buffer_cache_keeps_what_the_first_step_left_and_restores_the_limit():
    before = _cache_limit()
    memory_limit = mx.set_memory_limit(0)
    mx.set_memory_limit(memory_limit)

    def step():  # frees a 48 MiB and a 64 MiB buffer
        mx.eval((mx.ones((3 * 2**22,)) + 1).sum() + (mx.ones((2**24,)) * 2).sum())

    with StepBufferCache(enabled=True) as buffers:
        during_first = _cache_limit()
        step()
        cached = mx.get_cache_memory()
        buffers.step_done()
        step()
        buffers.step_done()  # only the first step sets the limit
        kept = mx.get_cache_memory()
        after_first = _cache_limit()  # (reading it sets the limit to 0 for a moment: it empties the cache)
    assert _cache_limit() == before
    if mx.default_device() == mx.cpu:
        assert during_first == memory_limit
        assert after_first == max(before, cached)  # what the first step left cached
        assert kept >= 48 * 2**20  # the second step's buffers stayed cached
        assert mx.get_cache_memory() <= before  # emptied on the way out
    else:
        assert during_first == after_first == before  # other backends keep their own (large) default


def test_step_buffer_cache_stands_aside_where_the_heap_keeps_freed_memory():
    from flux_1 import backend

    before = _cache_limit()
    with StepBufferCache() as buffers:
        inside = _cache_limit()
        buffers.step_done()
    assert (inside == before) == (backend.tune_malloc() or mx.default_device() != mx.cpu)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_model_at_head_imports_the_committed_models():
    repo = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    vae = cpu_speed._model_at("HEAD", "vae")
    assert hasattr(vae, "AutoEncoder") and hasattr(vae, "VAEParams")
    transformer = cpu_speed._model_at("HEAD", "transformer")
    assert hasattr(transformer, "FluxTransformer")
    assert transformer.cpu_math.__name__ == "cpu_math_at_HEAD"  # the revision's own cpu_math, not the tree's
    assert vae.cpu_math is transformer.cpu_math


def test_decode_parts_times_each_kind_of_layer_and_restores_the_classes():
    from flux_1.models import vae

    real = vae.Conv3x3.__call__, vae.Conv3x3.upsampled, vae.GroupNorm.__call__
    parts = cpu_speed._decode_parts(vae, size=16, rounds=1)
    assert (vae.Conv3x3.__call__, vae.Conv3x3.upsampled, vae.GroupNorm.__call__) == real
    assert {"conv3x3", "upsampler_conv", "group_norm_silu", "conv_out", "total", "rest"} <= set(parts)
    assert 0 < parts["conv3x3"] < parts["total"]
