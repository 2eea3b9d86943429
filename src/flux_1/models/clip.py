"""CLIP-L text encoder: FLUX.1's text_encoder (openai/clip-vit-large-patch14, text tower only).

transformers-5 parameter names, without the `text_model.` prefix of FLUX.1's files. Pre-LN causal
transformer with quick-GELU; returns the final hidden states and the pooled (EOS) vector FLUX uses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from .shapes import read_size

_LAYER_INDEX = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CLIPParams:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5  # not in the weights
    head_dim: int = 64  # not in the weights

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> CLIPParams:
        """Read the sizes off our-named weight shapes (rows and norm widths only: quantized weights read the same).

        Each size is read off every tensor of layer 0 that carries it and must agree, so a corrupt
        tensor is named itself (ValueError quoting its key); a missing one is a KeyError naming it.
        """

        agree = functools.partial(read_size, shapes)

        layer = "encoder.layers.0"
        hidden = agree("hidden size", [
            ("final_layer_norm.weight", 0), ("embeddings.token_embedding.weight", 1),
            ("embeddings.position_embedding.weight", 1), (f"{layer}.layer_norm1.weight", 0),
            (f"{layer}.self_attn.q_proj.weight", 0), (f"{layer}.self_attn.out_proj.weight", 0),
            (f"{layer}.mlp.fc2.weight", 0),
        ])
        if hidden % cls.head_dim:
            raise ValueError(f"'final_layer_norm.weight' has shape {(hidden,)}: not a multiple of the "
                             f"head dim {cls.head_dim}")
        layers = {int(m.group(1)) for key in shapes if (m := _LAYER_INDEX.match(key))}
        return cls(
            vocab_size=agree("vocabulary size", [("embeddings.token_embedding.weight", 0)]),
            hidden_size=hidden,
            intermediate_size=agree("mlp width", [(f"{layer}.mlp.fc1.weight", 0), (f"{layer}.mlp.fc1.bias", 0)]),
            num_layers=max(layers) + 1,
            max_positions=agree("position count", [("embeddings.position_embedding.weight", 0)]),
        )

class CLIPTextEmbeddings(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.token_embedding = nn.Embedding(params.vocab_size, params.hidden_size)
        self.position_embedding = nn.Embedding(params.max_positions, params.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids) + self.position_embedding(mx.arange(input_ids.shape[1]))


class CLIPAttention(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.num_heads = params.num_heads
        self.scale = params.head_dim**-0.5
        self.q_proj = nn.Linear(params.hidden_size, params.hidden_size)
        self.k_proj = nn.Linear(params.hidden_size, params.hidden_size)
        self.v_proj = nn.Linear(params.hidden_size, params.hidden_size)
        self.out_proj = nn.Linear(params.hidden_size, params.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CLIPMLP(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.fc1 = nn.Linear(params.hidden_size, params.intermediate_size)
        self.fc2 = nn.Linear(params.intermediate_size, params.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        # MLX's gelu_fast_approx is transformers' quick_gelu: x * sigmoid(1.702 x).
        return self.fc2(nn.gelu_fast_approx(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.self_attn = CLIPAttention(params)
        self.layer_norm1 = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
        self.mlp = CLIPMLP(params)
        self.layer_norm2 = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, params: CLIPParams):
        super().__init__()
        self.layers = [CLIPEncoderLayer(params) for _ in range(params.num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


def eos_positions(input_ids: mx.array) -> mx.array:
    """Index (B,) of the first largest id of each row: the EOS token, as CLIP's vocabulary ends with it.

    FLUX.1's config has the legacy eos_token_id = 2, for which transformers pools at argmax(input_ids).
    CLIP pads with EOS, so the max repeats; torch's argmax returns the first, and this picks the first
    explicitly rather than rely on how a backend breaks ties.
    """
    length = input_ids.shape[1]
    is_max = input_ids == input_ids.max(axis=-1, keepdims=True)
    return mx.where(is_max, mx.arange(length), length).min(axis=-1)


class CLIPTextModel(nn.Module):
    """input_ids (B, L <= 77) -> (hidden states (B, L, hidden) after final_layer_norm, pooled (B, hidden))."""

    def __init__(self, params: CLIPParams):
        super().__init__()
        self.params = params
        self.embeddings = CLIPTextEmbeddings(params)
        self.encoder = CLIPEncoder(params)
        self.final_layer_norm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        hidden = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        pooled = hidden[mx.arange(hidden.shape[0]), eos_positions(input_ids)]
        return hidden, pooled
