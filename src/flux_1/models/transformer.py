"""The FLUX.1 transformer: 19 double-stream blocks, then 38 single-stream blocks (MMDiT).

Module names follow BFL's checkpoints (fused q/k/v, fused `linear1`), see docs/DESIGN.md.
Shapes: B batch, N image tokens, L text tokens, D hidden, H heads, d head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import cpu_math
from .shapes import read_size


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64  # 16 latent channels x 2x2 patch; Fill 384 (+ masked image 64, mask 256), Canny/Depth 128
    out_channels: int = 64  # the velocity of the 64 packed latent channels, whatever the inputs
    context_dim: int = 4096  # T5-XXL width
    vec_dim: int = 768  # CLIP-L pooled width
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_hidden: int = 12288
    depth: int = 19
    depth_single: int = 38
    guidance_embed: bool = False  # dev: True, schnell: False
    theta: int = 10_000
    time_dim: int = 256  # sinusoidal timestep features

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        # RoPE over (text/index, row, column): (16, 56, 56) for head dim 128.
        d = self.head_dim
        return (d // 8, 7 * d // 16, 7 * d // 16)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> FluxParams:
        """Read the sizes off our-named weight shapes.

        Each width is read off every tensor that carries it and must agree: one corrupt tensor is then
        named itself (ValueError quoting its key), not a later tensor that no longer fits the
        architecture it implied. A missing tensor that a width is read from is a KeyError naming it.
        """

        agree = functools.partial(read_size, shapes)

        def count(prefix: str) -> int:
            ids = {int(k.split(".")[1]) for k in shapes if k.startswith(prefix + ".") and k.split(".")[1].isdigit()}
            return max(ids) + 1 if ids else 0

        double = any(k.startswith("double_blocks.") for k in shapes)
        hidden = agree("hidden size", [
            ("img_in.weight", 0, 0), ("img_in.bias", 0, 0), ("txt_in.weight", 0, 0), ("txt_in.bias", 0, 0),
            ("time_in.in_layer.weight", 0, 0), ("vector_in.in_layer.weight", 0, 0),
            ("final_layer.linear.weight", 1, 0), ("final_layer.adaLN_modulation.layers.1.weight", 1, 0),
        ])
        # Conditioned variants concatenate channels to the latents (Fill, Canny/Depth): img_in is wider
        # than final_layer.linear's output, so the two widths are read apart.
        in_channels = agree("in_channels", [("img_in.weight", 1, 0)])
        out_channels = agree("out_channels", [("final_layer.linear.weight", 0, 0), ("final_layer.linear.bias", 0, 0)])
        if in_channels % out_channels:  # the conditioning adds whole packed blocks: 64, 128, 384 inputs
            raise ValueError(f"'img_in.weight' has shape {tuple(shapes['img_in.weight'])}: it gives in_channels = "
                             f"{in_channels}, where 'final_layer.linear.weight', 'final_layer.linear.bias' give "
                             f"{out_channels} (conditioned models add whole multiples of it)")
        norm = "double_blocks.0.img_attn.norm" if double else "single_blocks.0.norm"
        head_dim = agree("head dim", [(f"{norm}.query_norm.weight", 0, 0), (f"{norm}.key_norm.weight", 0, 0)])
        if hidden % head_dim:
            raise ValueError(f"'{norm}.query_norm.weight' has shape {(head_dim,)}: head dim {head_dim} does "
                             f"not divide the hidden size {hidden}")
        if "single_blocks.0.linear1.weight" in shapes:
            mlp_hidden = agree("mlp width", [
                ("single_blocks.0.linear1.weight", 0, 3 * hidden), ("single_blocks.0.linear2.weight", 1, hidden),
                ("double_blocks.0.img_mlp.layers.0.weight", 0, 0), ("double_blocks.0.img_mlp.layers.2.weight", 1, 0),
            ])
        else:
            mlp_hidden = agree("mlp width", [
                ("double_blocks.0.img_mlp.layers.0.weight", 0, 0), ("double_blocks.0.img_mlp.layers.0.bias", 0, 0),
                ("double_blocks.0.img_mlp.layers.2.weight", 1, 0),
            ])
        time_dim = agree("timestep features", [("time_in.in_layer.weight", 1, 0),
                                               ("guidance_in.in_layer.weight", 1, 0)])
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            context_dim=agree("context width", [("txt_in.weight", 1, 0)]),
            vec_dim=agree("pooled width", [("vector_in.in_layer.weight", 1, 0)]),
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            mlp_hidden=mlp_hidden,
            depth=count("double_blocks"),
            depth_single=count("single_blocks"),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            time_dim=time_dim,
        )


# ---------------------------------------------------------------------------------------------
# Stateless maths


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10_000.0, factor: float = 1000.0):
    """Sinusoidal features (cos | sin) of t * factor; t in [0, 1] is the flow-matching sigma."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = (t.astype(mx.float32) * factor)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def rope(ids: mx.array, axes_dim: tuple[int, ...], theta: int) -> tuple[mx.array, mx.array]:
    """Rotary cos/sin tables for 3-axis position ids.

    ids: (S, 3) positions -> cos, sin: (S, d/2), one rotation angle per pair of channels.
    Computed in float32 once per generation (positions do not change between steps).
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
        angles.append(ids[:, axis].astype(mx.float32)[:, None] * freqs[None])
    angles = mx.concatenate(angles, axis=-1)
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate consecutive channel pairs (x0, x1) of x: (B, H, S, d) by the angles of (cos, sin)."""
    x = x.reshape(*x.shape[:-1], -1, 2).astype(mx.float32)
    x0, x1 = x[..., 0], x[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def attention(q: mx.array, k: mx.array, v: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    """RoPE then scaled dot-product attention. q, k, v: (B, H, S, d) -> (B, S, H*d)."""
    dtype = v.dtype
    q = apply_rope(q, *pe).astype(dtype)
    k = apply_rope(k, *pe).astype(dtype)
    out = cpu_math.sdpa(q, k, v, scale=q.shape[-1] ** -0.5)
    B, H, S, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, S, H * d)


def layer_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """LayerNorm without affine parameters (FLUX modulates instead)."""
    return mx.fast.layer_norm(x, None, None, eps)


# ---------------------------------------------------------------------------------------------
# Blocks


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def __call__(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """The per-stream half of a double block's attention: fused q/k/v, q/k norms, output proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x: (B, S, D) -> normed q, k and v, each (B, H, S, d)."""
        B, S, _ = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k = self.norm(qkv[0], qkv[1])
        return q, k, qkv[2]


class ShardedSum:
    """Where a tensor-parallel block sums its ranks' partial outputs (after proj, mlp.2, linear2, and
    the modulation's lin).

    `all_reduce` is None in one process (nothing happens); flux_1.parallel.tensor sets it to an
    mx.distributed.all_sum over its group when the block's linears are sharded."""

    all_reduce = None

    def reduce(self, x: mx.array) -> mx.array:
        return x if self.all_reduce is None else self.all_reduce(x)


class Modulation(nn.Module, ShardedSum):
    """adaLN: shift, scale and gate per sub-layer from the conditioning vector."""

    columns = None  # tensor parallel: the slice of the input features this rank's `lin` takes

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim)

    def __call__(self, vec: mx.array) -> list[mx.array]:
        h = nn.silu(vec)
        if self.columns is not None:
            h = h[:, self.columns]
        out = self.reduce(self.lin(h))[:, None, :]  # (B, 1, chunks*D)
        return mx.split(out, self.chunks, axis=-1)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return layer_norm(x) * (1 + scale) + shift


def gelu_tanh(x: mx.array) -> mx.array:
    """FLUX's GELU, the tanh approximation: on CPU as x * sigmoid(2z) with a fast exp (cpu_math, about 4x
    faster there, equal within float32 rounding); elsewhere MLX's own `gelu_approx`, unchanged."""
    return cpu_math.gelu(x)


class GELUTanh(nn.Module):
    """`gelu_tanh` as a parameterless layer (the `img_mlp.layers.1` slot of BFL's checkpoints)."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(x)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    # FLUX uses the tanh approximation of GELU.
    return nn.Sequential(nn.Linear(dim, hidden), GELUTanh(), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module, ShardedSum):
    """Image and text streams with their own weights, attending jointly over [text, image]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.img_mod = Modulation(dim, 6)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = mlp(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, 6)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = mlp(dim, mlp_hidden)

    def __call__(self, img: mx.array, txt: mx.array, vec: mx.array, pe) -> tuple[mx.array, mx.array]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))
        q = mx.concatenate([txt_q, img_q], axis=2)
        k = mx.concatenate([txt_k, img_k], axis=2)
        v = mx.concatenate([txt_v, img_v], axis=2)
        attn = attention(q, k, v, pe)  # (B, L+N, D)
        L = txt.shape[1]
        txt_attn, img_attn = attn[:, :L], attn[:, L:]

        img = img + i_gate1 * self.reduce(self.img_attn.proj(img_attn))
        img = img + i_gate2 * self.reduce(self.img_mlp(modulate(img, i_shift2, i_scale2)))
        txt = txt + t_gate1 * self.reduce(self.txt_attn.proj(txt_attn))
        txt = txt + t_gate2 * self.reduce(self.txt_mlp(modulate(txt, t_shift2, t_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module, ShardedSum):
    """One stream over [text, image]; attention and MLP run in parallel from one fused matmul."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads  # this rank's heads when tensor-parallel
        self.head_dim = dim // num_heads
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)  # q | k | v | mlp
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)  # attn | gelu(mlp) -> out
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 3)

    def __call__(self, x: mx.array, vec: mx.array, pe) -> mx.array:
        shift, scale, gate = self.modulation(vec)
        B, S, _ = x.shape
        h = self.linear1(modulate(x, shift, scale))
        width = 3 * self.num_heads * self.head_dim  # not 3 * D: sharded, a rank holds only its heads
        qkv, mlp = h[..., :width], h[..., width:]
        qkv = qkv.reshape(B, S, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k = self.norm(qkv[0], qkv[1])
        attn = attention(q, k, qkv[2], pe)
        out = self.reduce(self.linear2(mx.concatenate([attn, gelu_tanh(mlp)], axis=-1)))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def __call__(self, x: mx.array, vec: mx.array) -> mx.array:
        shift, scale = mx.split(self.adaLN_modulation(vec)[:, None, :], 2, axis=-1)
        return self.linear(modulate(x, shift, scale))


class FluxTransformer(nn.Module):
    # Training: recompute each block's activations in the backward pass instead of keeping them.
    grad_checkpoint = False

    def __init__(self, params: FluxParams):
        super().__init__()
        p = self.params = params
        D = p.hidden_size
        self.img_in = nn.Linear(p.in_channels, D)
        self.time_in = MLPEmbedder(p.time_dim, D)
        self.vector_in = MLPEmbedder(p.vec_dim, D)
        if p.guidance_embed:
            self.guidance_in = MLPEmbedder(p.time_dim, D)
        self.txt_in = nn.Linear(p.context_dim, D)
        self.double_blocks = [DoubleStreamBlock(D, p.num_heads, p.mlp_hidden) for _ in range(p.depth)]
        self.single_blocks = [SingleStreamBlock(D, p.num_heads, p.mlp_hidden) for _ in range(p.depth_single)]
        self.final_layer = LastLayer(D, p.out_channels)

    @property
    def input_channels(self) -> int:
        """Channels img_in takes now: params.in_channels, unless a control LoRA widened it (64 -> 128)."""
        m = self.img_in
        cols = m["weight"].shape[-1]
        return cols * 32 // m.bits if "scales" in m else cols  # a quantized weight packs 32/bits per column

    def conditioning(self, timestep, pooled, guidance, dtype) -> mx.array:
        """The vector every block is modulated by: time + pooled text (+ guidance for dev). (B, D)"""
        vec = self.time_in(timestep_embedding(timestep, self.params.time_dim).astype(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a guidance-distilled (dev) model: a guidance value is required")
            vec = vec + self.guidance_in(timestep_embedding(guidance, self.params.time_dim).astype(dtype))
        return vec + self.vector_in(pooled.astype(dtype))

    def position_embedding(self, img_ids: mx.array, txt_ids: mx.array) -> tuple[mx.array, mx.array]:
        ids = mx.concatenate([txt_ids, img_ids], axis=0)
        return rope(ids, self.params.axes_dim, self.params.theta)

    def __call__(
        self,
        img: mx.array,  # (B, N, in_channels) packed latents (+ concatenated conditioning channels)
        txt: mx.array,  # (B, L, context_dim) T5 hidden states
        pooled: mx.array,  # (B, vec_dim) CLIP pooled vector
        timestep: mx.array,  # (B,) sigma in [0, 1]
        img_ids: mx.array,  # (N, 3)
        txt_ids: mx.array,  # (L, 3)
        guidance: mx.array | None = None,  # (B,) dev only
        pe: tuple[mx.array, mx.array] | None = None,  # precomputed rope tables
    ) -> mx.array:
        dtype = img.dtype
        vec = self.conditioning(timestep, pooled, guidance, dtype)
        if pe is None:
            pe = self.position_embedding(img_ids, txt_ids)
        img = self.img_in(img)
        txt = self.txt_in(txt.astype(dtype))
        run = nn.utils.checkpoint if self.grad_checkpoint else lambda block: block
        for block in self.double_blocks:
            img, txt = run(block)(img, txt, vec, pe)
        L = txt.shape[1]
        x = mx.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = run(block)(x, vec, pe)
        return self.final_layer(x[:, L:], vec)
