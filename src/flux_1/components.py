"""The four FLUX.1 components and the compute precisions: the one registry every layer reads.

Each component's facts live here once: the folder it has in the diffusers and save.py layouts, the
file stem diffusers gives its shards, its model class and params dataclass, and what the quantization
policy keeps in full precision or quantizes beyond the linears. Loading, saving, quantization and the
bench all iterate over `COMPONENTS`; nothing else spells these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .models.clip import CLIPParams, CLIPTextModel
from .models.t5 import T5Encoder, T5Params
from .models.transformer import FluxParams, FluxTransformer
from .models.vae import AutoEncoder, VAEParams


@dataclass(frozen=True)
class Component:
    name: str  # our name: transformer, t5, clip, vae
    folder: str  # sub-folder in the diffusers layout and in save.py folders
    shard_stem: str  # diffusers' file stem: <stem>.safetensors or <stem>-0000i-of-0000n.safetensors
    model: type[nn.Module]
    params: type
    # Modules the policy never quantizes, though they are linears or embeddings (see quantization.py).
    keep_full_precision: tuple[str, ...] = ()
    # Embedding tables the policy quantizes (token tables); every other embedding stays.
    quantized_embeddings: tuple[str, ...] = ()
    quantizable: bool = True  # the VAE never is

    def build(self, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
        """The model, its architecture read off our-named weight shapes."""
        return self.model(self.params.from_shapes(shapes))


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("transformer", "transformer", "diffusion_pytorch_model", FluxTransformer, FluxParams,
                  keep_full_precision=("img_in", "final_layer.linear")),
        Component("t5", "text_encoder_2", "model", T5Encoder, T5Params,
                  keep_full_precision=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
                  quantized_embeddings=("shared",)),
        Component("clip", "text_encoder", "model", CLIPTextModel, CLIPParams,
                  keep_full_precision=("embeddings.position_embedding",),
                  quantized_embeddings=("embeddings.token_embedding",)),
        Component("vae", "vae", "diffusion_pytorch_model", AutoEncoder, VAEParams, quantizable=False),
    )
}


def component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; one of {', '.join(COMPONENTS)}")
    return COMPONENTS[name]


# -- tokenizers --------------------------------------------------------------------------------------

# Folder -> the files transformers needs from it (any one of each tuple). The tokenizers are read from
# these folders in every layout (diffusers, BFL single files beside them, save.py copies).
TOKENIZERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "tokenizer": (("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")),  # CLIP BPE
    "tokenizer_2": (("spiece.model", "tokenizer.json"),),  # T5 sentencepiece
}


def require_tokenizers(root: Path) -> None:
    """Fail early, naming the folder and file, when a tokenizer folder is missing or incomplete."""
    from .loading.weights import WeightLoadError

    for sub, needs in TOKENIZERS.items():
        folder = Path(root) / sub
        if not folder.is_dir():
            raise WeightLoadError(f"missing component folder {sub}/ in {root}")
        for choices in needs:
            if not any((folder / name).is_file() for name in choices):
                raise WeightLoadError(f"{folder}: incomplete tokenizer, none of {', '.join(choices)} is there")


# -- precisions ----------------------------------------------------------------------------------------

PRECISIONS: dict[str, mx.Dtype] = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def precision_dtype(name: str) -> mx.Dtype:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def default_precision() -> str:
    # bfloat16 matmuls are slow on the CPU backend; float32 is the CPU default.
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"
