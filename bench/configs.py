"""Named benchmark configurations: model dims, image size and token counts.

- `tiny`: every dimension small (seconds on a CPU); for the CI smoke test.
- `mid`: real widths (transformer 3072, T5 4096, CLIP 768, the real VAE) but few blocks
  (2 double + 4 single, T5 and CLIP 2 layers each) at 512x512 with 512 T5 tokens: a CPU-sized slice
  of the real model whose per-block cost is the real one.
- `slice`: real widths, 1 double + 2 single blocks, 256x256 + 256 T5 tokens (512 in all): the CPU
  speed comparison of issue #14, a step in seconds.
- `full`: FLUX.1-dev as shipped (19 + 38 blocks, T5-XXL 24 layers, CLIP-L 12 layers) at 1024x1024 and
  512 T5 tokens; for a GPU machine.

All three are dev-shaped (guidance embedder on), the anchors' default workload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flux_1.models.clip import CLIPParams
from flux_1.models.t5 import T5Params
from flux_1.models.transformer import FluxParams
from flux_1.models.vae import VAEParams


@dataclass(frozen=True)
class BenchConfig:
    name: str
    transformer: FluxParams
    t5: T5Params
    clip: CLIPParams
    vae: VAEParams
    height: int
    width: int
    txt_tokens: int  # T5 tokens (dev: 512)
    clip_tokens: int = 77
    # Stages whose predicted time exceeds this are projected instead of run (see bench/profile.py);
    # None: always run. Only `mid` sets it, for the CPU quantized matmul (see BENCHMARKS.md).
    max_stage_seconds: float | None = None
    note: str = ""

    @property
    def img_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "height": self.height,
            "width": self.width,
            "img_tokens": self.img_tokens,
            "txt_tokens": self.txt_tokens,
            "clip_tokens": self.clip_tokens,
            "transformer": asdict(self.transformer),
            "t5": asdict(self.t5),
            "clip": asdict(self.clip),
            "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.vae).items()},
            "note": self.note,
        }


CONFIGS = {
    "tiny": BenchConfig(
        name="tiny",
        transformer=FluxParams(context_dim=32, vec_dim=64, hidden_size=64, num_heads=2, mlp_hidden=256,
                               depth=2, depth_single=2, guidance_embed=True),
        t5=T5Params(vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
        clip=CLIPParams(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2),
        vae=VAEParams(block_out_channels=(32, 32, 64, 64)),
        height=128, width=128, txt_tokens=32,
        note="all dims tiny; smoke test only, timings mean nothing",
    ),
    "slice": BenchConfig(
        name="slice",
        transformer=FluxParams(depth=1, depth_single=2, guidance_embed=True),
        t5=T5Params(num_layers=2),
        clip=CLIPParams(num_layers=2),
        vae=VAEParams(),
        height=256, width=256, txt_tokens=256,
        note="real widths, 1 double + 2 single blocks, 256x256 + 256 T5 tokens (512 tokens): issue #14's same-run "
             "comparison",
    ),
    "mid": BenchConfig(
        name="mid",
        transformer=FluxParams(depth=2, depth_single=4, guidance_embed=True),
        t5=T5Params(num_layers=2),
        clip=CLIPParams(num_layers=2),
        vae=VAEParams(),
        height=512, width=512, txt_tokens=512,
        max_stage_seconds=150.0,
        note="real widths, 2 double + 4 single blocks (of 19 + 38), T5 2/24 layers, CLIP 2/12 layers, real VAE",
    ),
    "full": BenchConfig(
        name="full",
        transformer=FluxParams(guidance_embed=True),
        t5=T5Params(),
        clip=CLIPParams(),
        vae=VAEParams(),
        height=1024, width=1024, txt_tokens=512,
        note="FLUX.1-dev as shipped",
    ),
}


def get(name: str) -> BenchConfig:
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}: choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


# ---------------------------------------------------------------------------------------------
# config.json files, so that diffusers / transformers load the very same folder with from_pretrained


def diffusers_transformer_config(p: FluxParams) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": p.in_channels,
        "out_channels": None,
        "num_layers": p.depth,
        "num_single_layers": p.depth_single,
        "attention_head_dim": p.head_dim,
        "num_attention_heads": p.num_heads,
        "joint_attention_dim": p.context_dim,
        "pooled_projection_dim": p.vec_dim,
        "guidance_embeds": p.guidance_embed,
        "axes_dims_rope": list(p.axes_dim),
    }


def diffusers_vae_config(p: VAEParams) -> dict:
    n = len(p.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": p.in_channels,
        "out_channels": p.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(p.block_out_channels),
        "layers_per_block": p.layers_per_block,
        "act_fn": "silu",
        "latent_channels": p.latent_channels,
        "norm_num_groups": p.norm_groups,
        "sample_size": 1024,
        "scaling_factor": p.scaling_factor,
        "shift_factor": p.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
        "mid_block_add_attention": True,
    }


def t5_config(p: T5Params) -> dict:
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": p.vocab_size,
        "d_model": p.d_model,
        "d_kv": p.d_kv,
        "d_ff": p.d_ff,
        "num_layers": p.num_layers,
        "num_heads": p.num_heads,
        "relative_attention_num_buckets": p.relative_attention_num_buckets,
        "relative_attention_max_distance": p.relative_attention_max_distance,
        "layer_norm_epsilon": p.layer_norm_epsilon,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "dropout_rate": 0.1,
        "tie_word_embeddings": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def clip_config(p: CLIPParams) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "max_position_embeddings": p.max_positions,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": p.layer_norm_eps,
        "projection_dim": p.hidden_size,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    }
