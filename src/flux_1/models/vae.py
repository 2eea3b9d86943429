"""FLUX.1 autoencoder: diffusers' AutoencoderKL with FLUX's config (16 latent channels, no quant convs).

Parameter names are diffusers' names exactly (the Hub `vae/` layout); conv weights are MLX layout
(O, kH, kW, I) and activations are channels-last (B, H, W, C). The loader transposes torch weights.

Memory at 1024x1024 (float32; halve for bf16): the latent is 128x128, so the mid-block attention runs over
16384 tokens of width 512. The big tensors are in the decoder's last two up blocks: the upsampler of
up_blocks.2 outputs (1, 1024, 1024, 256) = 1 GiB, and every resnet of up_blocks.3 holds its input (the
residual) next to its (1, 1024, 1024, 128) = 512 MiB working tensor. The encoder mirrors this at its input.
Nothing below keeps a reference to an intermediate longer than the block that made it. 3x3 convs run in
row strips when large (`Conv3x3`): MLX's CPU backend lowers a conv to an im2col buffer 9x its input.
"""

import functools
import math
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from .shapes import read_size


@dataclass(frozen=True)
class VAEParams:
    in_channels: int = 3  # image channels the encoder reads
    out_channels: int = 3  # image channels the decoder writes
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per block; the decoder has one more per block
    norm_groups: int = 32
    norm_eps: float = 1e-6
    # Not in the weights: the pipeline maps encoder latents to the transformer's range with these.
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple]) -> "VAEParams":
        """Read widths and depths off our-named weight shapes (conv weights are (O, kH, kW, I)).

        Each width is read off every tensor that carries it and must agree, so a corrupt tensor is
        named itself (ValueError quoting its key); a missing one is a KeyError naming it.
        """

        agree = functools.partial(read_size, shapes)

        blocks = []
        while f"encoder.down_blocks.{len(blocks)}.resnets.0.conv1.weight" in shapes:
            i = len(blocks)
            blocks.append(agree(f"block {i} width", [
                (f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0),
                (f"encoder.down_blocks.{i}.resnets.0.conv1.bias", 0),
                (f"encoder.down_blocks.{i}.resnets.0.conv2.weight", 0),
                (f"encoder.down_blocks.{i}.resnets.0.norm2.weight", 0),
            ]))
        if not blocks:
            shapes["encoder.down_blocks.0.resnets.0.conv1.weight"]  # KeyError: names the first missing block
        layers = 0
        while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shapes:
            layers += 1
        return cls(
            in_channels=agree("image channels in", [("encoder.conv_in.weight", 3)]),
            out_channels=agree("image channels out", [("decoder.conv_out.weight", 0), ("decoder.conv_out.bias", 0)]),
            latent_channels=agree("latent channels", [  # the encoder outputs mean | log-variance
                ("decoder.conv_in.weight", 3), ("encoder.conv_out.weight", 0, 0, 2), ("encoder.conv_out.bias", 0, 0, 2),
            ]),
            block_out_channels=tuple(blocks),
            layers_per_block=layers,
        )

# Bytes of im2col buffer one strip of a 3x3 conv may need (9 x the strip's input).
STRIP_BYTES = 256 * 2**20


class _Progress:
    """Counts the conv strips of a decode: a counting pass (lazy: nothing is evaluated) gives the
    total, then the real pass reports each strip as it is evaluated."""

    def __init__(self, callback: Callable[[int, int], None] | None, counting: bool, total: int = 0):
        self.callback, self.counting, self.total, self.done = callback, counting, total, 0

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


_progress: ContextVar[_Progress | None] = ContextVar("vae_progress", default=None)


@contextmanager
def _reporting(progress: _Progress):
    token = _progress.set(progress)
    try:
        yield progress
    finally:
        _progress.reset(token)


class Conv3x3(nn.Conv2d):
    """3x3 conv, stride 1, padding 1, computed in horizontal strips when its input is large.

    The CPU backend lowers a conv to an explicit im2col buffer of 9x the input: 9.6 GB for the
    decoder's (1, 1024, 1024, 256) float32 tensor. A 3x3 conv only looks one row up and down, so strips
    with a one-row halo give exactly the same output while the buffer stays one strip's worth.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        rows = max(1, STRIP_BYTES // (9 * B * W * C * x.dtype.size))
        progress = _progress.get()
        if progress is not None and progress.counting:  # shapes only: nothing is computed
            progress.total += -(-H // rows)
            return mx.zeros((B, H, W, self.weight.shape[0]), dtype=x.dtype)
        if rows >= H:
            if progress is None:
                return super().__call__(x)
            out = super().__call__(x)
            mx.eval(out)  # evaluated here only to report it: the same numbers either way
            progress.step()
            return out
        strips = []
        for top in range(0, H, rows):
            bottom = min(top + rows, H)
            strip = x[:, max(top - 1, 0) : min(bottom + 1, H)]  # with the halo rows that exist
            pad_rows = (int(top == 0), int(bottom == H))  # zero padding only at the image border
            strip = mx.pad(strip, [(0, 0), pad_rows, (1, 1), (0, 0)])
            strips.append(mx.conv2d(strip, self.weight))
            mx.eval(strips[-1])  # one strip's im2col buffer at a time (a lazy graph would overlap them)
            if progress is not None:
                progress.step()
        return mx.concatenate(strips, axis=1) + self.bias


def _norm(channels: int, p: VAEParams) -> nn.GroupNorm:
    # pytorch_compatible: statistics per (group, all pixels), as torch.nn.GroupNorm computes them.
    return nn.GroupNorm(p.norm_groups, channels, eps=p.norm_eps, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, p: VAEParams):
        super().__init__()
        self.norm1 = _norm(in_channels, p)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = _norm(out_channels, p)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            # A 1x1 Conv2d, not a Linear, so the weight keeps diffusers' 4-D shape (O, 1, 1, I).
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W pixels, with a residual add (the mid block only)."""

    def __init__(self, channels: int, p: VAEParams):
        super().__init__()
        self.group_norm = _norm(channels, p)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]  # diffusers' to_out.0 (to_out.1 is a dropout)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, heads=1, tokens, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # At 1024x1024 this is 16384 tokens: where the fused kernel does not cover head dim C, the scores
        # (16384, 16384) are materialised (1 GiB in float32).
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.to_out[0](h).reshape(B, H, W, C)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric padding, one row at the bottom and one column at the right, as diffusers does.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        # Nearest 2x: (B, H, 1, W, 1, C) broadcast to (B, H, 2, W, 2, C); the reshape makes the one copy.
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return self.conv(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, p: VAEParams):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, p), ResnetBlock(channels, channels, p)]
        self.attentions = [AttentionBlock(channels, p)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, downsample: bool, p: VAEParams):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, p) for j in range(num_resnets)
        ]
        if downsample:
            self.downsamplers = [Downsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, upsample: bool, p: VAEParams):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, p) for j in range(num_resnets)
        ]
        if upsample:
            self.upsamplers = [Upsample(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    """(B, H, W, in_channels) image -> (B, H/2^(n-1), W/2^(n-1), 2 * latent_channels) moments."""

    def __init__(self, p: VAEParams):
        super().__init__()
        ch = p.block_out_channels
        self.conv_in = Conv3x3(p.in_channels, ch[0])
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block, i < len(ch) - 1, p)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], p)
        self.conv_norm_out = _norm(ch[-1], p)
        self.conv_out = Conv3x3(ch[-1], 2 * p.latent_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, h, w, latent_channels) latents -> (B, h*2^(n-1), w*2^(n-1), out_channels) image."""

    def __init__(self, p: VAEParams):
        super().__init__()
        ch = tuple(reversed(p.block_out_channels))  # widest first
        self.conv_in = Conv3x3(p.latent_channels, ch[0])
        self.mid_block = MidBlock(ch[0], p)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block + 1, i < len(ch) - 1, p)
            for i in range(len(ch))
        ]
        self.conv_norm_out = _norm(ch[-1], p)
        self.conv_out = Conv3x3(ch[-1], p.out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoEncoder(nn.Module):
    def __init__(self, params: VAEParams = VAEParams()):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, image: mx.array) -> tuple[mx.array, mx.array]:
        """(B, H, W, 3) image in [-1, 1] -> raw (mean, logvar), each (B, H/8, W/8, latent_channels)."""
        moments = self.encoder(image)
        mean, logvar = mx.split(moments, 2, axis=-1)
        # As diffusers' DiagonalGaussianDistribution, so exp(logvar) stays finite.
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode_latents(self, image: mx.array) -> mx.array:
        """(B, H, W, 3) image in [-1, 1] -> the posterior mean in the transformer's latent space
        (B, H/8, W/8, latent_channels): deterministic, as diffusers' `sample_mode="argmax"`."""
        mean, _ = self.encode(image)
        return self.scale_latents(mean.astype(mx.float32))

    def decode(self, latents: mx.array, progress: Callable[[int, int], None] | None = None) -> mx.array:
        """(B, h, w, latent_channels) unscaled latents -> (B, 8h, 8w, 3) image, roughly in [-1, 1].

        `progress(done, total)` is called after each 3x3 conv (strip) is evaluated; total is counted
        first by tracing the decoder lazily (no computation). The output is the same with or without it.
        """
        if progress is None:
            return self.decoder(latents)
        with _reporting(_Progress(None, counting=True)) as count:
            self.decoder(latents)  # a lazy graph, never evaluated: only counts the strips
        with _reporting(_Progress(progress, counting=False, total=count.total)):
            return self.decoder(latents)

    def scale_latents(self, z: mx.array) -> mx.array:
        """Encoder latents -> the transformer's latent space."""
        return (z - self.params.shift_factor) * self.params.scaling_factor

    def unscale_latents(self, z: mx.array) -> mx.array:
        """The transformer's latent space -> what `decode` takes."""
        return z / self.params.scaling_factor + self.params.shift_factor
