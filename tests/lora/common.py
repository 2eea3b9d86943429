"""Tiny models with our module names, LoRA files on disk, and a layer's effective weight."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors.numpy import save_file

D, MLP, IN, CTX, VEC, TIME = 32, 64, 8, 16, 12, 16  # tiny transformer sizes
CLIP_D, CLIP_MLP = 16, 32

try:
    from flux_1.models.transformer import FluxParams, FluxTransformer
except ImportError:  # the stub below mirrors its module names
    FluxTransformer = None

try:
    from flux_1.models.clip import CLIPParams, CLIPTextModel
except ImportError:
    CLIPTextModel = None


class _Node(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


def _stub_transformer(guidance: bool) -> nn.Module:
    L = nn.Linear
    mlp = lambda a, b: _Node(layers=[L(a, b), nn.GELU(), L(b, a)])  # noqa: E731
    emb = lambda a: _Node(in_layer=L(a, D), out_layer=L(D, D))  # noqa: E731
    attn = lambda: _Node(qkv=L(D, 3 * D), proj=L(D, D))  # noqa: E731
    double = _Node(
        img_mod=_Node(lin=L(D, 6 * D)), img_attn=attn(), img_mlp=mlp(D, MLP),
        txt_mod=_Node(lin=L(D, 6 * D)), txt_attn=attn(), txt_mlp=mlp(D, MLP),
    )  # fmt: skip
    single = _Node(linear1=L(D, 3 * D + MLP), linear2=L(D + MLP, D), modulation=_Node(lin=L(D, 3 * D)))
    final = _Node(adaLN_modulation=_Node(layers=[nn.SiLU(), L(D, 2 * D)]), linear=L(D, IN))
    extra = {"guidance_in": emb(TIME)} if guidance else {}
    return _Node(img_in=L(IN, D), time_in=emb(TIME), vector_in=emb(VEC), txt_in=L(CTX, D), **extra,
                 double_blocks=[double], single_blocks=[single], final_layer=final)  # fmt: skip


def tiny_transformer(guidance: bool = True) -> nn.Module:
    """One double and one single block; the real FluxTransformer when importable."""
    mx.random.seed(0)
    if FluxTransformer is not None:
        sizes = dict(
            in_channels=IN, context_dim=CTX, vec_dim=VEC, hidden_size=D, mlp_hidden=MLP, time_dim=TIME
        )
        model = FluxTransformer(
            FluxParams(**sizes, num_heads=1, depth=1, depth_single=1, guidance_embed=guidance)
        )
    else:
        model = _stub_transformer(guidance)
    mx.eval(model.parameters())
    return model


def tiny_clip() -> nn.Module:
    mx.random.seed(1)
    if CLIPTextModel is not None:
        model = CLIPTextModel(CLIPParams(vocab_size=50, hidden_size=CLIP_D, intermediate_size=CLIP_MLP,
                                         num_layers=2, max_positions=8, head_dim=8))  # fmt: skip
    else:
        L = nn.Linear
        layer = lambda: _Node(  # noqa: E731
            self_attn=_Node(q_proj=L(CLIP_D, CLIP_D), k_proj=L(CLIP_D, CLIP_D), v_proj=L(CLIP_D, CLIP_D),
                            out_proj=L(CLIP_D, CLIP_D)),
            mlp=_Node(fc1=L(CLIP_D, CLIP_MLP), fc2=L(CLIP_MLP, CLIP_D)),
        )  # fmt: skip
        model = _Node(encoder=_Node(layers=[layer(), layer()]))
    mx.eval(model.parameters())
    return model


def get(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def effective_weight(layer: nn.Module) -> np.ndarray:
    """(out, in) float64 weight the layer applies, whatever it is (merged, side path, quantized)."""
    n_in = layer["weight"].shape[1] * 32 // layer.bits if "scales" in layer else layer["weight"].shape[1]
    y = layer(mx.eye(n_in)) - layer(mx.zeros((1, n_in)))
    return np.array(y, dtype=np.float64).T


def effective_weights(model: nn.Module, modules: list[str]) -> dict[str, np.ndarray]:
    return {m: effective_weight(get(model, m)) for m in modules}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]


class Rand:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / 4).astype(np.float32)


def write(tmp_path, name: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def swap(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]])
