"""FLUX.1 autoencoder: diffusers' AutoencoderKL with FLUX's config (16 latent channels, no quant convs).

Parameter names are diffusers' names exactly (the Hub `vae/` layout); conv weights are MLX layout
(O, kH, kW, I) and activations are channels-last (B, H, W, C). The loader transposes torch weights.

Memory at 1024x1024 (float32; halve for bf16): the latent is 128x128, so the mid-block attention runs over
16384 tokens of width 512. The big tensors are in the decoder's last two up blocks: the upsampler of
up_blocks.2 outputs (1, 1024, 1024, 256) = 1 GiB, and every resnet of up_blocks.3 holds its input (the
residual) next to its (1, 1024, 1024, 128) = 512 MiB working tensor. The encoder mirrors this at its input.
Nothing below keeps a reference to an intermediate longer than the block that made it. 3x3 convs run in
row strips when large (`Conv3x3`), as 9 offset GEMMs (`conv3x3_valid`: MLX's CPU conv would build an
im2col buffer 9x its input); the decoder's upsamplers fold their nearest 2x into that conv on the CPU
(`upsample2x_conv3x3_valid`: 16 GEMMs on the low-resolution input, no upsampled copy).
"""

import functools
import math
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from . import cpu_math
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

# Strip size of a 3x3 conv, in bytes of the im2col buffer MLX's conv would need (9 x the strip's input);
# `conv3x3_valid` needs under half of that.
STRIP_BYTES = 256 * 2**20
# Strip size of a Winograd conv, in bytes of the strip's input: its transforms write 4x the input and 4x the
# output, and run (single-threaded) 1.3-1.7x faster on strips whose tiles stay in the CPU's cache than on a
# 256x256x128 image at once (2 MiB was the best of 0.5-8 MiB at every decoder shape, 2-core EPYC).
WINOGRAD_STRIP_BYTES = 2 * 2**20


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


def conv3x3_valid(x: mx.array, weight: mx.array, bias: mx.array | None = None, spare_row: bool = False) -> mx.array:
    """Unpadded 3x3 conv: x (B, h+2, w+2, C), weight (O, 3, 3, C), optional bias (O,) -> (B, h, w, O),
    without MLX's im2col. With `spare_row`, x carries one more (zero) row below, (B, h+3, w+2, C), that
    the conv ignores: `Conv3x3` pads its strips so, which saves a copy of the output (below).

    Flattened to (pixels, C) rows, the input shifted by (i, j) is the contiguous row range starting at
    i*(w+2) + j, so the conv is 9 GEMMs of offset views accumulated in place (`addmm`, the bias riding
    in the first), computed on the padded width and cropped: no 9x buffer, and 1.2-1.45x faster than
    `mx.conv2d` at the decoder's shapes on CPU (BENCHMARKS.md). The last taps' ranges end 2 rows past
    the image: inside the spare row, or else the output is computed 2 rows short and padded (a copy).
    Where the output is much narrower than the input (the decoder's conv_out, 128 -> 3), one GEMM
    C -> 9*O and the sum of its 9 shifted slices instead (16x faster). GPUs have real conv kernels:
    `mx.conv2d` there."""
    if mx.default_device() != mx.cpu:
        out = mx.conv2d(x[:, :-1] if spare_row else x, weight)
        return out if bias is None else out + bias
    if x.shape[0] > 1:
        return mx.concatenate([conv3x3_valid(image[None], weight, bias, spare_row) for image in x])
    _, hp, wp, C = x.shape
    h, w = hp - 2 - int(spare_row), wp - 2
    out_channels = weight.shape[0]
    taps = weight.transpose(1, 2, 3, 0)  # (3, 3, C, O)
    if 4 * out_channels <= C:
        x = x[:, :-1] if spare_row else x
        each = (x.reshape(-1, C) @ taps.transpose(2, 0, 1, 3).reshape(C, 9 * out_channels))
        each = each.reshape(1, h + 2, wp, 3, 3, out_channels)
        out = each[:, 0:h, 0:w, 0, 0] if bias is None else each[:, 0:h, 0:w, 0, 0] + bias
        for i, j in ((i, j) for i in range(3) for j in range(3) if i or j):
            out = out + each[:, i : i + h, j : j + w, i, j]  # output (r, c) takes tap (i, j) of input (r+i, c+j)
        return out
    rows = x.reshape(-1, C)
    n = h * wp if spare_row else h * wp - 2  # output rows on the padded width (crop columns included)
    out = rows[:n] @ taps[0, 0] if bias is None else mx.addmm(bias, rows[:n], taps[0, 0])
    for i, j in ((i, j) for i in range(3) for j in range(3) if i or j):
        out = mx.addmm(out, rows[i * wp + j : i * wp + j + n], taps[i, j])
    if not spare_row:
        out = mx.pad(out, [(0, 2), (0, 0)])
    return out.reshape(1, h, wp, out_channels)[:, :, :w]


def _interleave_2x2(phases, rows: int, cols: int) -> mx.array:
    """4 phases (rows * cols pixels or (rows, cols) views, channels last) in (row parity, column parity)
    order -> (1, 2 rows, 2 cols, O): phase (s, t) is pixel (2a + s, 2b + t), written in place from views
    (no intermediate stacks)."""
    channels = phases[0].shape[-1]
    out = mx.zeros((rows, 2, cols, 2, channels), dtype=phases[0].dtype)
    for k, phase in enumerate(phases):
        out[:, k // 2, :, k % 2] = phase if phase.ndim == 3 else phase.reshape(rows, cols, channels)
    return out.reshape(1, 2 * rows, 2 * cols, channels)


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): a 2x2
# output tile from a 4x4 input tile as Y = A^T [(G g G^T) * (B^T d B)] A, 16 multiplies per input/output
# channel pair where the direct conv does 36. G holds halves (exact in binary) and B, A only +-1, so the
# result differs from the direct sum by float32 rounding of a few more additions.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight: mx.array) -> mx.array:
    """3x3 conv weight (O, 3, 3, C) -> U = G g G^T, (4, 4, C, O) in float32."""
    g = mx.array(_WINOGRAD_G, dtype=mx.float32)
    w = weight.astype(mx.float32).transpose(1, 2, 3, 0)  # (3, 3, C, O)
    u = mx.tensordot(g, w, axes=[[1], [0]])  # (4, 3, C, O): rows transformed
    return mx.tensordot(g, u, axes=[[1], [1]]).transpose(1, 0, 2, 3)  # (4, 4, C, O)


@mx.compile
def _winograd_bt(d0: mx.array, d1: mx.array, d2: mx.array, d3: mx.array) -> tuple[mx.array, ...]:
    # B^T along one axis: the 4 input rows (or columns) of every tile -> its 4 transformed ones
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@mx.compile
def _winograd_at(*m: mx.array) -> tuple[mx.array, ...]:
    # A^T M A for every tile at once: m[4k + l] is (tiles, O) -> the tiles' outputs (0,0), (0,1), (1,0), (1,1)
    cols = [(m[4 * k] + m[4 * k + 1] + m[4 * k + 2], m[4 * k + 1] - m[4 * k + 2] - m[4 * k + 3]) for k in range(4)]
    return tuple(cols[0][v] + cols[1][v] + cols[2][v] for v in range(2)) + tuple(
        cols[1][v] - cols[2][v] - cols[3][v] for v in range(2))


def conv3x3_winograd(x: mx.array, u: mx.array, bias: mx.array | None = None, spare_row: bool = False) -> mx.array:
    """`conv3x3_valid` by Winograd F(2x2, 3x3), on the CPU backend, float32: x (B, h+2, w+2, C)
    with h and w even (plus a spare row below with `spare_row`), `u` from `winograd_weight` -> (B, h, w, O).

    The input transform runs along columns, then rows, on strided views (tile (a, b) reads padded input
    rows 2a..2a+3 and columns 2b..2b+3); each of the 16 transformed positions is then one GEMM
    (tiles, C) @ (C, O) over every tile: 2.25x fewer FLOPs than the 9 offset GEMMs. The transforms are
    single-threaded passes over 4x the input and 4x the output, so the gain depends on the GEMMs' speed:
    in `WINOGRAD_STRIP_BYTES` strips, 1.25-1.65x faster than `conv3x3_valid` at the decoder's shapes with
    OpenBLAS's AVX2 kernels, 0.78-1.12x with its AVX-512 ones (BENCHMARKS.md)."""
    if x.shape[0] > 1:
        return mx.concatenate([conv3x3_winograd(image[None], u, bias, spare_row) for image in x])
    _, hp, wp, C = x.shape
    h, w = hp - 2 - int(spare_row), wp - 2
    image = x[0]
    V = [None] * 16  # V[4k + l]: (h/2, w/2, C), transformed tile position (k, l)
    for col, c in enumerate(_winograd_bt(*(image[:, j : j + w : 2] for j in range(4)))):
        for row, r in enumerate(_winograd_bt(*(c[i : i + h : 2] for i in range(4)))):
            V[4 * row + col] = r
    tiles = (h // 2) * (w // 2)
    # The bias rides in position (1, 1)'s GEMM: A^T's column 1 is all ones, so it reaches every output.
    M = [V[k].reshape(tiles, C) @ u[k // 4, k % 4] if k != 5 or bias is None
         else mx.addmm(bias, V[k].reshape(tiles, C), u[1, 1]) for k in range(16)]
    return _interleave_2x2(_winograd_at(*M), h // 2, w // 2)


# Nearest 2x then a 3x3 conv, seen from the low-resolution input: output row 2a+s reads upsampled rows
# 2a+s-1 .. 2a+s+1, i.e. input rows (a-1, a, a) for s = 0 and (a, a, a+1) for s = 1. _UPSAMPLE_FOLD[s, d, i]
# is 1 where tap row i lands on the d-th of the two input rows that phase s reads (a-1+s+d); columns alike.
_UPSAMPLE_FOLD = ((((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))))


def fold_upsample_weight(weight: mx.array) -> mx.array:
    """3x3 conv weight (O, 3, 3, C) -> (2, 2, 2, 2, C, O): per output phase (row parity s, column parity t)
    the 2x2 taps (d, e) of the equivalent conv on the low-resolution input, summed in float32."""
    fold = mx.array(_UPSAMPLE_FOLD, dtype=mx.float32)  # (s, d, i)
    w = weight.astype(mx.float32)
    w = mx.tensordot(fold, w, axes=[[2], [1]])  # (s, d, O, j, C): tap rows summed
    w = mx.tensordot(fold, w, axes=[[2], [3]])  # (t, e, s, d, O, C): tap columns summed
    return w.transpose(2, 0, 3, 1, 5, 4).astype(weight.dtype)  # (s, t, d, e, C, O)


def upsample2x_conv3x3_valid(x: mx.array, folded: mx.array, bias: mx.array | None = None,
                             spare_row: bool = False) -> mx.array:
    """`conv3x3_valid` of the nearest-2x upsample, without making the upsample: x (B, h+2, w+2, C), the
    low-resolution input zero padded by one (zero padding of the upsampled image is the same thing),
    `folded` from `fold_upsample_weight`, optional `bias` (O,) -> (B, 2h, 2w, O). `spare_row`: x carries
    one more zero row below, as in `conv3x3_valid`.

    Each output phase (s, t) is a 2x2 conv on x: 4 offset GEMMs as in `conv3x3_valid`, 16 in all on h*w
    pixels, against 9 on the 4*h*w upsampled ones (2.25x fewer FLOPs), then one interleaving write."""
    if x.shape[0] > 1:
        return mx.concatenate([upsample2x_conv3x3_valid(image[None], folded, bias, spare_row) for image in x])
    _, hp, wp, C = x.shape
    h, w = hp - 2 - int(spare_row), wp - 2
    n = h * wp  # output rows on the padded width; the last two read 2 pixels past the image
    rows = x.reshape(-1, C) if spare_row else mx.pad(x.reshape(-1, C), [(0, 2), (0, 0)])
    phases = []
    for s in range(2):
        for t in range(2):
            out = None
            for d in range(2):
                for e in range(2):
                    start = (s + d) * wp + t + e  # phase (s, t), tap (d, e) reads input (a+s+d, b+t+e)
                    tap = rows[start : start + n]
                    if out is None:  # the bias rides in the first GEMM's output: no pass of its own
                        out = tap @ folded[s, t, d, e] if bias is None else mx.addmm(bias, tap, folded[s, t, d, e])
                    else:
                        out = mx.addmm(out, tap, folded[s, t, d, e])
            phases.append(out.reshape(h, wp, -1)[:, :w])
    # The crops go straight from their views (2.5x faster than nested stacks, no intermediate copies).
    return _interleave_2x2(phases, h, w)


# The nearest 2x upsample as seen by a Winograd F(2x2, 3x3) tile: the output tile at (2a, 2b) reads upsampled
# rows 2a-1 .. 2a+2, which are low-resolution rows a-1, a, a, a+1, so B^T applied to them is B^T E with E
# the (4, 3) duplication: rows (1, -1, 0), (0, 2, 0), (0, 0, 0), (0, 1, -1). The zero row drops 7 of the 16
# transformed positions; the 2 is folded into the weight, leaving the input transform two differences.
_UPSAMPLE_WINOGRAD_KEEP = (0, 1, 3)


def upsample_winograd_weight(weight: mx.array) -> mx.array:
    """3x3 conv weight (O, 3, 3, C) -> (3, 3, C, O): U = G g G^T at the kept positions (0, 1, 3) of each axis,
    times 2 per axis at position 1 (B^T E's 2), in float32."""
    keep = mx.array(_UPSAMPLE_WINOGRAD_KEEP)
    u = winograd_weight(weight)[keep][:, keep]
    twice = mx.array([1.0, 2.0, 1.0], dtype=mx.float32)
    return u * twice[:, None, None, None] * twice[None, :, None, None]


@mx.compile
def _differences(p0: mx.array, p1: mx.array, p2: mx.array) -> tuple[mx.array, mx.array]:
    return p0 - p1, p1 - p2


@mx.compile
def _upsample_winograd_at(*m: mx.array) -> tuple[mx.array, ...]:
    # A^T M A at the kept positions: m[3k + j] is (pixels, O) -> output phases (0, 0), (0, 1), (1, 0), (1, 1)
    rows = [[m[j] + m[3 + j] for j in range(3)], [m[3 + j] - m[6 + j] for j in range(3)]]
    return tuple(r[0] + r[1] if v == 0 else r[1] - r[2] for r in rows for v in range(2))


def upsample2x_conv3x3_winograd(x: mx.array, u: mx.array, bias: mx.array | None = None,
                                spare_row: bool = False) -> mx.array:
    """`upsample2x_conv3x3_valid` by Winograd F(2x2, 3x3) on the upsampled image, on the CPU backend, float32:
    x (B, h+2, w+2, C) padded low-resolution input (plus a spare row below with `spare_row`), `u` from
    `upsample_winograd_weight` -> (B, 2h, 2w, O).

    Each low-resolution pixel is one 2x2 output tile; its transformed input is the 3x3 neighbourhood's
    row and column differences (B^T E above), so 9 GEMMs (pixels, C) @ (C, O) against the folded
    path's 16: at the decoder's upsamplers 1.25-1.4x faster with OpenBLAS's AVX2 kernels, 0.97-1.17x with
    its AVX-512 ones (BENCHMARKS.md), within float32 rounding."""
    if x.shape[0] > 1:
        return mx.concatenate([upsample2x_conv3x3_winograd(image[None], u, bias, spare_row) for image in x])
    _, hp, wp, C = x.shape
    h, w = hp - 2 - int(spare_row), wp - 2
    image = x[0]
    up, down = _differences(image[0:h], image[1 : h + 1], image[2 : h + 2])  # rows a-1 - a, a - (a+1)
    V = []
    for rows in (up, image[1 : h + 1], down):
        left, right = _differences(rows[:, 0:w], rows[:, 1 : w + 1], rows[:, 2 : w + 2])
        V += [left, rows[:, 1 : w + 1], right]
    pixels = h * w
    # The bias rides in position (1, 1)'s GEMM: A^T's column 1 is all ones, so it reaches every output.
    M = [V[k].reshape(pixels, C) @ u[k // 3, k % 3] if k != 4 or bias is None
         else mx.addmm(bias, V[k].reshape(pixels, C), u[1, 1]) for k in range(9)]
    return _interleave_2x2(_upsample_winograd_at(*M), h, w)


def upsample_nearest2x(x: mx.array) -> mx.array:
    # (B, H, 1, W, 1, C) broadcast to (B, H, 2, W, 2, C); the reshape makes the one copy.
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


class Conv3x3(nn.Conv2d):
    """3x3 conv, stride 1, padding 1 (`conv3x3_valid`), computed in horizontal strips when its input is
    large.

    MLX's own conv lowers to an im2col buffer of 9x the input on the CPU (9.6 GB for the decoder's
    (1, 1024, 1024, 256) float32 tensor); `conv3x3_valid` has none, but still holds a padded copy of
    its input and two output-sized accumulators. A 3x3 conv only looks one row up and down, so strips
    with a one-row halo give exactly the same output while those stay one strip's worth.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        if self._winograd(x):
            u = winograd_weight(self.weight)
            rows = max(2, WINOGRAD_STRIP_BYTES // (B * (W + 2) * C * x.dtype.size) // 2 * 2)  # even
            return self._in_strips(x, rows, 1, lambda strip: conv3x3_winograd(strip, u, self.bias, True))
        rows = max(1, STRIP_BYTES // (9 * B * W * C * x.dtype.size))
        return self._in_strips(x, rows, 1, lambda strip: conv3x3_valid(strip, self.weight, self.bias, True))

    def _winograd_upsample(self, x: mx.array) -> bool:
        """Whether `upsampled` runs `upsample2x_conv3x3_winograd` (float32; on the CPU, which calls it)."""
        return x.dtype == mx.float32

    def _winograd(self, x: mx.array) -> bool:
        """Whether `conv3x3_winograd` runs: CPU, float32 (its extra additions would round at bf16's 8 bits),
        even height and width (2x2 tiles), and not a narrow output (conv_out's 3 channels: the GEMMs are
        too small to pay for the transforms; `conv3x3_valid` has its own path there)."""
        _, H, W, C = x.shape
        return (mx.default_device() == mx.cpu and x.dtype == mx.float32 and H % 2 == 0 and W % 2 == 0
                and 4 * self.weight.shape[0] > C)

    def upsampled(self, x: mx.array) -> mx.array:
        """self(upsample_nearest2x(x)): on the CPU without the upsampled copy (float32:
        `upsample2x_conv3x3_winograd`, else `upsample2x_conv3x3_valid`), in strips of half the low-resolution
        rows so each strip's output is no larger than `__call__`'s on the upsampled input. GPUs have real conv
        kernels: the upsample and `mx.conv2d` there."""
        if mx.default_device() != mx.cpu:
            return self(upsample_nearest2x(x))
        B, H, W, C = x.shape
        rows = max(1, STRIP_BYTES // (9 * B * 2 * W * C * x.dtype.size) // 2)
        if self._winograd_upsample(x):
            u = upsample_winograd_weight(self.weight)
            return self._in_strips(x, rows, 2, lambda strip: upsample2x_conv3x3_winograd(strip, u, self.bias, True))
        folded = fold_upsample_weight(self.weight)
        return self._in_strips(x, rows, 2, lambda strip: upsample2x_conv3x3_valid(strip, folded, self.bias, True))

    def _in_strips(self, x: mx.array, rows: int, scale: int, conv: Callable[[mx.array], mx.array]) -> mx.array:
        """`conv` (a valid conv with bias, output `scale` x its input's size less the border) over strips of
        `rows` input rows, each zero padded by one at the image border and with one halo row elsewhere, and
        one spare zero row below (the convs' `spare_row`)."""
        B, H, W, C = x.shape
        progress = _progress.get()
        if progress is not None and progress.counting:  # shapes only: nothing is computed
            progress.total += -(-H // rows)
            return mx.zeros((B, scale * H, scale * W, self.weight.shape[0]), dtype=x.dtype)
        strips = []
        for top in range(0, H, rows):
            bottom = min(top + rows, H)
            strip = x[:, max(top - 1, 0) : min(bottom + 1, H)]  # with the halo rows that exist
            pad_rows = (int(top == 0), int(bottom == H) + 1)  # zero padding at the image border; spare row
            strip = mx.pad(strip, [(0, 0), pad_rows, (1, 1), (0, 0)])
            strips.append(conv(strip))
            if rows < H or progress is not None:
                # One strip's working set at a time (a lazy graph would overlap them); a single strip is
                # evaluated here only to report it: the same numbers either way.
                mx.eval(strips[-1])
            if progress is not None:
                progress.step()
        return strips[0] if len(strips) == 1 else mx.concatenate(strips, axis=1)


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return x * scale + shift


@mx.compile
def _scale_shift_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    # silu(y) = y * sigmoid(y), written y / (1 + exp(-y)): one exp, one pass (y << 0: -0, not NaN).
    y = x * scale + shift
    return y / (1 + mx.exp(-y))


def group_stats(x: mx.array, groups: int, eps: float) -> tuple[mx.array, mx.array]:
    """Mean and 1/std per (image, channel group) of x (B, ..., C), as float32 (B, groups) arrays.

    Reduced per channel over the pixels first (a contiguous reduction), then per group: no transposed
    copies of x (MLX's pytorch-compatible GroupNorm makes two), and two-pass (mean, then the squared
    deviations) so the variance does not cancel."""
    B, C = x.shape[0], x.shape[-1]
    pixels = x.reshape(B, -1, groups, C // groups).astype(mx.float32)
    mean = pixels.mean(axis=1).mean(axis=-1)  # (B, groups)
    deviations = mx.square(pixels - mean[:, None, :, None])
    var = deviations.mean(axis=1).mean(axis=-1)
    return mean, mx.rsqrt(var + eps)


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm (statistics per group over all pixels), channels-last, optionally followed by
    SiLU in the same pass (every norm of the VAE but the attention's feeds a SiLU). Applied as one
    fused x * scale + shift per channel."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        B, C, G = x.shape[0], x.shape[-1], self.num_groups
        mean, inv_std = group_stats(x, G, self.eps)
        scale = mx.repeat(inv_std, C // G, axis=-1) * self.weight  # (B, C)
        shift = self.bias - mx.repeat(mean, C // G, axis=-1) * scale
        shape = (B,) + (1,) * (x.ndim - 2) + (C,)
        if not silu:
            apply = _scale_shift
        else:
            apply = cpu_math.scale_shift_silu if cpu_math.on_cpu() else _scale_shift_silu
        return apply(x, scale.reshape(shape), shift.reshape(shape)).astype(x.dtype)


def _norm(channels: int, p: VAEParams) -> GroupNorm:
    return GroupNorm(p.norm_groups, channels, p.norm_eps)


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
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
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
        # (16384, 16384) are materialised (1 GiB in float32); on CPU cpu_math.attention takes them in
        # chunks of query rows.
        h = cpu_math.sdpa(q, k, v, scale=1.0 / math.sqrt(C))
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
        return self.conv.upsampled(x)  # conv(nearest 2x of x), the upsample folded into the conv on CPU


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
        return self.conv_out(self.conv_norm_out(x, silu=True))


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
        return self.conv_out(self.conv_norm_out(x, silu=True))


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
