"""bench/cpu_speed.py (issue #14's A/B experiments) and the step buffer cache the pipeline and bench share."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from bench import cpu_speed
from flux_1.models.transformer import FluxParams
from flux_1.pipeline.flux1 import StepBufferCache


def test_alternate_interleaves_variants_and_skips_warmup():
    order = []
    out = cpu_speed.alternate({"a": lambda: order.append("a") or mx.zeros(1),
                               "b": lambda: order.append("b") or mx.zeros(1)}, rounds=2, warmup=1)
    assert order == ["a", "b"] * 3  # in turn each round, the warm-up round included
    assert set(out) == {"a", "b"} and all(len(v["all_s"]) == 2 for v in out.values())
    assert all(v["min_s"] <= v["median_s"] for v in out.values())


def test_step_buffer_cache_raises_the_limit_and_restores_it():
    params = FluxParams(hidden_size=64, num_heads=2, mlp_hidden=256)
    before = mx.set_cache_limit(0)
    mx.set_cache_limit(before)
    cache = StepBufferCache(tokens=100, params=params, dtype=mx.float32)
    assert cache.limit == 100 * (12 * 64 + 3 * 256) * 4 + 2 * 100 * 100 * 4
    with cache:
        inside = mx.set_cache_limit(0)
        mx.set_cache_limit(inside)
    after = mx.set_cache_limit(0)
    mx.set_cache_limit(after)
    assert after == before
    if mx.default_device() == mx.cpu:
        assert inside == max(before, cache.limit)
    else:
        assert inside == before  # other backends keep their own (large) default


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_vae_at_head_imports_the_committed_decoder():
    repo = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    module = cpu_speed._vae_at("HEAD")
    assert hasattr(module, "AutoEncoder") and hasattr(module, "VAEParams")
