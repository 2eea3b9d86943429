"""Tiny models with our module names, LoRA files on disk, and a layer's effective weight."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors.numpy import save_file

from flux_1.models.clip import CLIPParams, CLIPTextModel
from flux_1.models.transformer import FluxParams, FluxTransformer

D, MLP, IN, CTX, VEC, TIME = 32, 64, 8, 16, 12, 16  # tiny transformer sizes
CLIP_D, CLIP_MLP = 16, 32



def tiny_transformer(guidance: bool = True) -> nn.Module:
    """One double and one single block."""
    mx.random.seed(0)
    sizes = dict(in_channels=IN, context_dim=CTX, vec_dim=VEC, hidden_size=D, mlp_hidden=MLP, time_dim=TIME)
    if "out_channels" in FluxParams.__dataclass_fields__:  # conditioned variants: img_in wider than the output
        sizes["out_channels"] = IN
    model = FluxTransformer(FluxParams(**sizes, num_heads=1, depth=1, depth_single=1, guidance_embed=guidance))
    mx.eval(model.parameters())
    return model


def tiny_clip() -> nn.Module:
    mx.random.seed(1)
    model = CLIPTextModel(CLIPParams(vocab_size=50, hidden_size=CLIP_D, intermediate_size=CLIP_MLP,
                                     num_layers=2, max_positions=8, head_dim=8))
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


# ---------------------------------------------------------------------------------------------
# Raw safetensors files: any dtype (numpy has no bf16 / float8) and any header, valid or not.

DTYPE_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
            "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8"}  # fmt: skip


def encode(x: np.ndarray, dtype: str) -> bytes:
    """x in a safetensors dtype: BF16 truncates float32 (exact for values that are bf16), F8 takes the
    nearest finite code."""
    if dtype == "BF16":
        return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    if dtype.startswith("F8_"):
        from flux_1.lora.formats import FP8

        table = np.where(np.isfinite(FP8[dtype]), FP8[dtype], np.inf)
        return np.abs(np.asarray(x, np.float32).reshape(-1, 1) - table).argmin(axis=1).astype(np.uint8).tobytes()
    return np.asarray(x).astype(DTYPE_NP[dtype]).tobytes()


def decode(raw: bytes, dtype: str, shape) -> np.ndarray:
    """The float32 values of raw bytes in a float safetensors dtype."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype.startswith("F8_"):
        from flux_1.lora.formats import FP8

        return FP8[dtype][np.frombuffer(raw, np.uint8)].reshape(shape)
    return np.frombuffer(raw, DTYPE_NP[dtype]).astype(np.float32).reshape(shape)


def serialize(header: dict, data: bytes, pad: int = 8) -> bytes:
    """A safetensors file from a header (offsets as given) and its data section."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % pad)
    return struct.pack("<Q", len(h)) + h + data


def build(entries: dict[str, tuple], metadata: dict | None = None) -> tuple[dict, bytes]:
    """(header, data) for {name: (dtype, array) or (dtype, shape, raw bytes)}, laid out in order."""
    header, data = ({"__metadata__": metadata} if metadata is not None else {}), b""
    for name, (dtype, *x) in entries.items():
        shape, raw = x if len(x) == 2 else (list(np.shape(x[0])), encode(x[0], dtype))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def write_raw(tmp_path, name: str, entries: dict, metadata: dict | None = None):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(serialize(*build(entries, metadata)))
    return path
