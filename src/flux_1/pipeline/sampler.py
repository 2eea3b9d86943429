"""FLUX.1 flow matching: the sigma schedule, Euler steps, latent packing and position ids."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

LATENT_CHANNELS = 16
VAE_FACTOR = 8
PATCH = 2  # latents are packed into 2x2 patches: one token per 16x16 pixels


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Shift sigmas towards 1 (more time at high noise) by exp(mu), as dev is trained to."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def resolution_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Linear in the number of image tokens: 0.5 at 256 tokens (512px), 1.15 at 4096 (1024px)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def schedule(num_steps: int, image_seq_len: int, shift: bool) -> np.ndarray:
    """num_steps + 1 sigmas from 1 down to 0 (float32): linspace(1, 1/n, n), shifted for dev, then 0."""
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if shift:
        sigmas = time_shift(resolution_mu(image_seq_len), sigmas)
    return np.append(sigmas, 0.0).astype(np.float32)


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x_{next} = x + (sigma_next - sigma) * v, computed in float32 like the reference scheduler."""
    out = latents.astype(mx.float32) + (sigma_next - sigma) * velocity.astype(mx.float32)
    return out.astype(latents.dtype)


def latent_grid(height: int, width: int) -> tuple[int, int]:
    """Packed token grid (rows, cols) for an image size in pixels (multiples of 16)."""
    return height // (VAE_FACTOR * PATCH), width // (VAE_FACTOR * PATCH)


def unpack(tokens: mx.array, height: int, width: int) -> mx.array:
    """(B, h/2 * w/2, C*4) packed tokens (diffusers' layout: index c*4 + dy*2 + dx per 2x2 patch) of an
    image of height x width pixels -> (B, h, w, C) channels-last latents."""
    rows, cols = latent_grid(height, width)
    B, _, D = tokens.shape
    C = D // 4
    x = tokens.reshape(B, rows, cols, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, rows * 2, cols * 2, C)


def pack(latents: mx.array) -> mx.array:
    """(B, h, w, C) channels-last latents -> (B, h/2 * w/2, C*4) tokens: the inverse of `unpack`."""
    B, h, w, C = latents.shape
    x = latents.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def image_ids(height: int, width: int) -> mx.array:
    """(N, 3) position ids of the image tokens: (0, row, col)."""
    rows, cols = latent_grid(height, width)
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return mx.array(ids.reshape(rows * cols, 3))


def text_ids(length: int) -> mx.array:
    """Text tokens all sit at position 0 on every axis."""
    return mx.zeros((length, 3), dtype=mx.float32)


def initial_noise(seed: int, height: int, width: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Packed Gaussian noise (1, N, 64) from the seed alone (MLX's RNG: not torch's numbers)."""
    rows, cols = latent_grid(height, width)
    noise = mx.random.normal((1, rows * cols, LATENT_CHANNELS * PATCH * PATCH), key=mx.random.key(seed))
    return noise.astype(dtype)
