"""The rectified-flow training objective of FLUX.1, as diffusers' train_dreambooth_lora_flux.py computes it.

    x_t = (1 - sigma) x_0 + sigma e,     target = e - x_0,     loss = mean_b mean(w_b (v(x_t, sigma) - target)^2)

sigma is drawn by `sample_sigmas` (diffusers' compute_density_for_timestep_sampling, then the index
into the training scheduler's 1000 sigmas) and w by `loss_weighting` (compute_loss_weighting_for_sd3).
Latents are channels-last (B, h, w, 16), as models/vae.py `encode_latents` gives them (shifted and
scaled); (B, 16, h, w), diffusers' layout, is accepted too when its last axis is not 16.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..pipeline import sampler

SAMPLING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")  # diffusers' --weighting_scheme
DEFAULT_GUIDANCE = 3.5  # diffusers' --guidance_scale: what dev sees while training


def _scheme(scheme: str) -> str:
    if scheme not in SAMPLING_SCHEMES:
        raise ValueError(f"unknown weighting scheme {scheme!r}; choose one of {', '.join(SAMPLING_SCHEMES)}")
    return scheme


def scheduler_sigmas(num_train_timesteps: int = 1000) -> mx.array:
    """The FlowMatchEulerDiscreteScheduler's training sigmas for FLUX (dynamic shifting: unshifted):
    linspace(1, T, T)[::-1] / T in float32, so index i holds (T - i) / T."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    return mx.array(t / np.float32(num_train_timesteps))  # numpy: a correctly rounded division, as torch


def density_samples(key, batch: int, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                    mode_scale: float = 1.29) -> mx.array:
    """u in [0, 1], (batch,): diffusers' compute_density_for_timestep_sampling."""
    if _scheme(scheme) == "logit_normal":
        return mx.sigmoid(logit_mean + logit_std * mx.random.normal((batch,), key=key))
    u = mx.random.uniform(shape=(batch,), key=key)
    if scheme == "mode":
        return 1 - u - mode_scale * (mx.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(key, batch: int, scheme: str = "logit_normal", logit_mean=0.0, logit_std=1.0,
                  mode_scale=1.29, num_train_timesteps=1000) -> mx.array:
    """(batch,) float32 training sigmas: u from the scheme, then the scheduler sigma at index
    floor(u * T) (clipped to the last index, where diffusers would index out of range at u = 1)."""
    u = density_samples(key, batch, scheme, logit_mean, logit_std, mode_scale)
    index = mx.clip(mx.floor(u * num_train_timesteps), 0, num_train_timesteps - 1).astype(mx.int32)
    return scheduler_sigmas(num_train_timesteps)[index]


def loss_weighting(scheme: str, sigmas: mx.array) -> mx.array:
    """Per-sample loss weights (like sigmas): diffusers' compute_loss_weighting_for_sd3."""
    if _scheme(scheme) == "sigma_sqrt":
        return (sigmas.astype(mx.float32) ** -2.0)
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    return mx.ones_like(sigmas)


def channels_last(x: mx.array, what: str) -> mx.array:
    """(B, h, w, 16) as is; (B, 16, h, w) transposed; anything else is a ValueError naming `what`."""
    C = sampler.LATENT_CHANNELS
    if x.ndim == 4 and x.shape[-1] == C:
        return x
    if x.ndim == 4 and x.shape[1] == C:
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"{what} has shape {tuple(x.shape)}: expected (B, h, w, {C}) latents")


def compute_dtype(transformer: nn.Module) -> mx.Dtype:
    """The dtype the transformer runs in: that of img_in (never quantized)."""
    return transformer.img_in["weight"].dtype


def flow_loss(transformer, latents, txt, pooled, sigmas, noise, guidance=None, weighting="none") -> mx.array:
    """The scalar flow-matching loss of one batch (float32).

    latents, noise: (B, h, w, 16) (or (B, 16, h, w)), h and w even; txt (B, L, context_dim);
    pooled (B, vec_dim); sigmas (B,); guidance: a number or (B,), default 3.5 for a guidance-distilled
    (dev) model, ignored by schnell; weighting: a `loss_weighting` scheme.
    """
    x0 = channels_last(latents, "latents")
    e = channels_last(noise, "noise")
    if e.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(e.shape)}, latents {tuple(x0.shape)}: they must match")
    B, h, w, _ = x0.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents of {h}x{w} cannot be packed into 2x2 patches (need even sides)")
    sigmas = mx.array(sigmas, dtype=mx.float32).reshape(-1)
    if sigmas.shape[0] != B:
        raise ValueError(f"got {sigmas.shape[0]} sigmas for a batch of {B}")
    p = transformer.params
    if txt.ndim != 3 or txt.shape[0] != B or txt.shape[2] != p.context_dim:
        raise ValueError(f"txt has shape {tuple(txt.shape)}: expected ({B}, L, {p.context_dim}) T5 states")
    if pooled.shape != (B, p.vec_dim):
        raise ValueError(f"pooled has shape {tuple(pooled.shape)}: expected ({B}, {p.vec_dim})")
    dtype = compute_dtype(transformer)
    s = sigmas[:, None, None, None]
    x0, e = x0.astype(mx.float32), e.astype(mx.float32)
    x_t = ((1 - s) * x0 + s * e).astype(dtype)
    if p.guidance_embed:
        g = DEFAULT_GUIDANCE if guidance is None else guidance
        guidance = mx.broadcast_to(mx.array(g, dtype=mx.float32).reshape(-1), (B,))
    else:
        guidance = None
    pred = transformer(
        sampler.pack(x_t), txt.astype(dtype), pooled.astype(dtype), sigmas,
        sampler.image_ids(h * sampler.VAE_FACTOR, w * sampler.VAE_FACTOR), sampler.text_ids(txt.shape[1]),
        guidance=guidance,
    )
    # Packing is a permutation within each sample: the per-sample mean is the same on packed tokens.
    err = (pred.astype(mx.float32) - sampler.pack(e - x0)) ** 2
    weights = loss_weighting(weighting, sigmas).astype(mx.float32)
    return mx.mean(mx.mean(weights[:, None, None] * err, axis=(1, 2)))


def loss_and_grad(transformer: nn.Module):
    """`f(latents, txt, pooled, sigmas, noise, guidance=None, weighting="none") -> (loss, grads)`: the
    loss of `flow_loss` on this transformer and its gradient, a tree like
    `transformer.trainable_parameters()` (the LoRA factors). Passing the transformer again as the first
    argument (nn.value_and_grad style) is accepted."""

    def loss(*args, **kwargs):
        if args and isinstance(args[0], nn.Module):
            args = args[1:]
        return flow_loss(transformer, *args, **kwargs)

    return nn.value_and_grad(transformer, loss)
