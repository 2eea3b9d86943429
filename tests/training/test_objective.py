"""The flow-matching objective: sigma sampling and loss weights (== diffusers' training_utils and
scheduler), and flow_loss's layouts, guidance default and refusals. Its value and gradients against
diffusers + PEFT: test_gradient_parity.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flux_1.loading import folder
from flux_1.training import flow_loss, loss_weighting, sample_sigmas
from flux_1.training.objective import SAMPLING_SCHEMES, density_samples, scheduler_sigmas

from .common import batch, mx_batch

N = 256


def test_scheduler_sigmas_are_the_unshifted_training_grid():
    s = np.array(scheduler_sigmas())
    assert s.shape == (1000,) and s[0] == 1.0 and s[-1] == np.float32(0.001)
    np.testing.assert_allclose(s, (1000 - np.arange(1000)) / 1000, rtol=1e-6)


@pytest.mark.parametrize("scheme", SAMPLING_SCHEMES)
def test_sample_sigmas_match_diffusers(monkeypatch, scheme):
    """diffusers' compute_density_for_timestep_sampling fed our random draws, then the script's index
    into FlowMatchEulerDiscreteScheduler (FLUX's config) and get_sigmas lookup."""
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    from diffusers import FlowMatchEulerDiscreteScheduler

    key = mx.random.key(4)
    kwargs = dict(logit_mean=0.2, logit_std=1.3, mode_scale=1.29)
    ours = np.array(sample_sigmas(key, N, scheme, **kwargs))
    z = np.array(mx.random.normal((N,), key=key))  # the draws density_samples makes with this key
    u = np.array(mx.random.uniform(shape=(N,), key=key))
    monkeypatch.setattr(torch, "normal", lambda mean, std, size, **_: mean + std * torch.from_numpy(z))
    monkeypatch.setattr(torch, "rand", lambda size, **_: torch.from_numpy(u))
    ref_u = training_utils.compute_density_for_timestep_sampling(scheme, N, **kwargs)
    np.testing.assert_allclose(np.array(density_samples(key, N, scheme, **kwargs)), ref_u.numpy(), rtol=1e-6)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    timesteps = scheduler.timesteps[(ref_u * 1000).long()]
    index = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    assert np.array_equal(ours, scheduler.sigmas[index].numpy())
    assert ours.dtype == np.float32 and ours.min() > 0 and ours.max() <= 1
    assert len(np.unique(ours)) > N // 4  # spread, not one value


def test_sample_sigmas_follow_the_key_and_the_scheme():
    a, b = sample_sigmas(mx.random.key(0), 8), sample_sigmas(mx.random.key(0), 8)
    assert np.array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(sample_sigmas(mx.random.key(1), 8)))
    mode = np.array(sample_sigmas(mx.random.key(0), 4096, "mode", mode_scale=1.29))
    uniform = np.array(sample_sigmas(mx.random.key(0), 4096, "none"))
    assert abs(np.mean((mode > 0.3) & (mode < 0.7)) - np.mean((uniform > 0.3) & (uniform < 0.7))) > 0.05


@pytest.mark.parametrize("scheme", SAMPLING_SCHEMES)
def test_loss_weighting_matches_diffusers(scheme):
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    sigmas = np.linspace(0.01, 1.0, 17, dtype=np.float32)
    ref = training_utils.compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(np.array(loss_weighting(scheme, mx.array(sigmas))), ref, rtol=1e-6)


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="unknown weighting scheme 'uniform'; choose one of logit_normal"):
        sample_sigmas(mx.random.key(0), 2, "uniform")
    with pytest.raises(ValueError, match="'sigma'"):
        loss_weighting("sigma", mx.ones(2))


@pytest.fixture(scope="module")
def dev(tiny_dev):
    return folder.load_folder_component(tiny_dev, "transformer", mx.float32)


def test_channels_first_latents_give_the_same_loss(dev):
    b = mx_batch(batch(dev.params))
    loss = flow_loss(dev, **b)
    first = {**b, "latents": b["latents"].transpose(0, 3, 1, 2), "noise": b["noise"].transpose(0, 3, 1, 2)}
    assert loss.shape == () and loss.dtype == mx.float32 and loss.item() > 0
    assert abs(flow_loss(dev, **first).item() - loss.item()) <= 1e-6 * loss.item()


def test_guidance_defaults_to_3_5_on_dev(dev):
    b = mx_batch(batch(dev.params))
    assert flow_loss(dev, **b).item() == flow_loss(dev, **b, guidance=3.5).item()
    assert flow_loss(dev, **b).item() != flow_loss(dev, **b, guidance=1.0).item()


def test_weighting_weights_each_sample(dev):
    b = mx_batch(batch(dev.params))
    per_sample = [flow_loss(dev, **{k: v[i : i + 1] for k, v in b.items()}).item() for i in range(2)]
    assert abs(flow_loss(dev, **b).item() - np.mean(per_sample)) <= 1e-5 * np.mean(per_sample)
    w = np.array(b["sigmas"]) ** -2.0
    expected = np.mean(w * np.array(per_sample))
    assert abs(flow_loss(dev, **b, weighting="sigma_sqrt").item() - expected) <= 1e-5 * expected


@pytest.mark.parametrize("change,message", [
    ({"noise": mx.zeros((2, 4, 4, 16))}, r"noise has shape \(2, 4, 4, 16\), latents \(2, 4, 6, 16\)"),
    ({"latents": mx.zeros((2, 4, 6, 8)), "noise": mx.zeros((2, 4, 6, 8))}, r"latents has shape \(2, 4, 6, 8\)"),
    ({"latents": mx.zeros((2, 3, 6, 16)), "noise": mx.zeros((2, 3, 6, 16))}, "latents of 3x6 cannot be packed"),
    ({"sigmas": mx.array([0.5])}, "got 1 sigmas for a batch of 2"),
    ({"txt": mx.zeros((1, 5, 32))}, r"txt has shape \(1, 5, 32\): expected \(2, L, 32\)"),
    ({"txt": mx.zeros((2, 5, 31))}, r"txt has shape \(2, 5, 31\)"),
    ({"pooled": mx.zeros((2, 5))}, r"pooled has shape \(2, 5\): expected \(2, 64\)"),
])  # fmt: skip
def test_bad_inputs_are_one_clear_error(dev, change, message):
    with pytest.raises(ValueError, match=message):
        flow_loss(dev, **{**mx_batch(batch(dev.params)), **change})
