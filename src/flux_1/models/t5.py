"""T5 v1.1 encoder: FLUX.1's text_encoder_2 (google/t5-v1_1-xxl), under Hugging Face's parameter names.

Pre-norm blocks with RMS norm, unscaled attention plus a relative position bias (computed by block 0,
shared by every block) and a gated-GELU feed forward. Only the last hidden state is returned.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from . import cpu_math
from .shapes import read_size

_BLOCK_INDEX = re.compile(r"encoder\.block\.(\d+)\.")


@dataclass(frozen=True)
class T5Params:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # not in the weights
    layer_norm_epsilon: float = 1e-6  # not in the weights

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> T5Params:
        """Read the sizes off our-named weight shapes.

        Only output (row) sizes and norm widths are used, so quantized weights (packed input columns)
        read the same, except the tiny relative attention bias table, which must stay unquantized.
        Each size is read off every tensor of block 0 that carries it and must agree, so a corrupt
        tensor is named itself (ValueError quoting its key); a missing one is a KeyError naming it.
        """

        agree = functools.partial(read_size, shapes)

        attention = "encoder.block.0.layer.0.SelfAttention"
        ff = "encoder.block.0.layer.1.DenseReluDense"
        num_heads = agree("head count", [(f"{attention}.relative_attention_bias.weight", 1)])
        d_model = agree("d_model", [
            ("encoder.final_layer_norm.weight", 0), ("shared.weight", 1),
            ("encoder.block.0.layer.0.layer_norm.weight", 0),
            (f"{attention}.o.weight", 0), (f"{ff}.wo.weight", 0), ("encoder.block.0.layer.1.layer_norm.weight", 0),
        ])
        inner = agree("attention width", [(f"{attention}.q.weight", 0), (f"{attention}.k.weight", 0),
                                          (f"{attention}.v.weight", 0)])
        if inner % num_heads:
            raise ValueError(f"'{attention}.q.weight' has shape {tuple(shapes[f'{attention}.q.weight'])}: "
                             f"{inner} rows do not split into {num_heads} heads")
        blocks = {int(m.group(1)) for key in shapes if (m := _BLOCK_INDEX.match(key))}
        return cls(
            vocab_size=agree("vocabulary size", [("shared.weight", 0)]),
            d_model=d_model,
            d_kv=inner // num_heads,
            num_heads=num_heads,
            d_ff=agree("d_ff", [(f"{ff}.wi_0.weight", 0), (f"{ff}.wi_1.weight", 0)]),
            num_layers=max(blocks) + 1,
            relative_attention_num_buckets=agree("bucket count", [(f"{attention}.relative_attention_bias.weight", 0)]),
        )

def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 bucket (int32, same shape) of each relative position (key index - query index).

    Half the buckets are for keys after the query. Within each half, distances below a quarter of
    num_buckets get their own bucket; the rest are log-spaced up to max_distance, beyond which all share
    the last bucket.
    """
    num_buckets //= 2
    bucket = (relative_position > 0).astype(mx.int32) * num_buckets
    distance = mx.abs(relative_position).astype(mx.int32)
    max_exact = num_buckets // 2
    # Same float32 operations, in the same order, as transformers: the boundaries 16, 32 and 64 of
    # t5-v1_1 land exactly on integers and must round the same way. distance >= 1 keeps log finite.
    log_distance = mx.log(mx.maximum(distance, 1).astype(mx.float32) / max_exact)
    log_ratio = log_distance / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (num_buckets - max_exact)).astype(mx.int32)
    far = mx.minimum(far, num_buckets - 1)
    return bucket + mx.where(distance < max_exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, params: T5Params, has_relative_attention_bias: bool = False):
        super().__init__()
        inner = params.num_heads * params.d_kv
        self.num_heads = params.num_heads
        self.num_buckets = params.relative_attention_num_buckets
        self.max_distance = params.relative_attention_max_distance
        self.q = nn.Linear(params.d_model, inner, bias=False)
        self.k = nn.Linear(params.d_model, inner, bias=False)
        self.v = nn.Linear(params.d_model, inner, bias=False)
        self.o = nn.Linear(inner, params.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """Additive attention bias (1, H, L, L) from the bucket table; only block 0 has one."""
        positions = mx.arange(length)
        relative = positions[None, :] - positions[:, None]  # (L query, L key)
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for p in (self.q, self.k, self.v)
        )
        # T5 folds 1/sqrt(d_kv) into its weights: no scaling here.
        out = cpu_math.sdpa(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, params: T5Params, has_relative_attention_bias: bool = False):
        super().__init__()
        self.SelfAttention = T5Attention(params, has_relative_attention_bias)
        self.layer_norm = nn.RMSNorm(params.d_model, eps=params.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, params: T5Params):
        super().__init__()
        self.wi_0 = nn.Linear(params.d_model, params.d_ff, bias=False)
        self.wi_1 = nn.Linear(params.d_model, params.d_ff, bias=False)
        self.wo = nn.Linear(params.d_ff, params.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # transformers' "gelu_new" (gated-gelu) is the tanh approximation.
        return self.wo(cpu_math.gelu(self.wi_0(x)) * self.wi_1(x))  # T5's gelu_new: the tanh form


class T5LayerFF(nn.Module):
    def __init__(self, params: T5Params):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(params)
        self.layer_norm = nn.RMSNorm(params.d_model, eps=params.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, params: T5Params, has_relative_attention_bias: bool = False):
        super().__init__()
        self.layer = [T5LayerSelfAttention(params, has_relative_attention_bias), T5LayerFF(params)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, params: T5Params):
        super().__init__()
        self.block = [T5Block(params, has_relative_attention_bias=i == 0) for i in range(params.num_layers)]
        self.final_layer_norm = nn.RMSNorm(params.d_model, eps=params.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1]).astype(x.dtype)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """input_ids (B, L) int32 -> last hidden state (B, L, d_model), in the parameters' dtype.

    No attention mask: FluxPipeline passes none, so padding tokens are attended like real ones.
    """

    def __init__(self, params: T5Params):
        super().__init__()
        self.params = params
        self.shared = nn.Embedding(params.vocab_size, params.d_model)
        self.encoder = T5Stack(params)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.encoder(self.shared(input_ids))
