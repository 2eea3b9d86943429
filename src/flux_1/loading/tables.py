"""Name tables: how each source format's module names map onto ours (see docs/DESIGN.md).

A table is a list of `Rule`s at module granularity: the parameter suffix (`.weight`, `.bias`,
`.scales`, ...) is carried over unchanged. A source module may be one *part* of a fused module of
ours (diffusers `to_q`/`to_k`/`to_v` are the row blocks of our `qkv`); parts are concatenated along
the output axis in part order. Part sizes are never constants: they come from the tensors when
loading and from our module's shape when splitting a LoRA (`part_rows`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    source: str  # regex matched in full against the source module name
    target: str  # our module name, with \1-style groups from `source`
    part: int = 0  # which row block of the target this source module is
    parts: int = 1  # how many row blocks the target is made of
    swap_halves: bool = False  # the source stores (a | b) where we store (b | a) along the rows

    def match(self, name: str) -> str | None:
        m = re.fullmatch(self.source, name)
        return m.expand(self.target) if m else None


@dataclass(frozen=True)
class Resolved:
    target: str
    part: int
    parts: int
    swap_halves: bool


def resolve(table: list[Rule], module: str) -> Resolved | None:
    """Our module (and row block) for a source module name, or None if the table has no rule."""
    for rule in table:
        target = rule.match(module)
        if target is not None:
            return Resolved(target, rule.part, rule.parts, rule.swap_halves)
    return None


@functools.cache
def _inverse(rule: Rule) -> tuple[re.Pattern, str] | None:
    r"""(regex over our names, template of the source name) of a rule whose source is a plain dotted
    name with `(\d+)` groups; None for rules that cannot be inverted that way."""
    count = iter(range(1, 10))
    template = re.sub(r"\(\\d\+\)", lambda _: f"{{g{next(count)}}}", rule.source).replace(r"\.", ".")
    if re.search(r"[\\()\[\]|*+?]", template):
        return None
    target = re.sub(r"\\\\(\d)", r"(?P<g\1>\\d+)", re.escape(rule.target))
    return re.compile(target), template


def source_names(table: list[Rule], module: str) -> list[tuple[str, Resolved]]:
    """The inverse of `resolve`: every source module name the table maps onto our `module`, in part
    order (one name, or the row blocks of a fused module). A name another rule shadows is left out."""
    names = []
    for rule in table:
        inverse = _inverse(rule)
        if inverse is None:
            continue
        pattern, template = inverse
        if m := pattern.fullmatch(module):
            name = template.format(**m.groupdict())
            if resolve(table, name) == Resolved(module, rule.part, rule.parts, rule.swap_halves):
                names.append((name, Resolved(module, rule.part, rule.parts, rule.swap_halves)))
    return sorted(names, key=lambda n: n[1].part)


def part_rows(target: str, out_features: int, in_features: int, parts: int) -> list[int]:
    """Row counts of each part of a fused module of ours, derived from its shape.

    `qkv` is q | k | v of equal size; a single block's `linear1` is q | k | v | mlp, where
    q, k and v are each as wide as the block's input (the hidden size).
    """
    if parts == 1:
        return [out_features]
    if target.endswith("linear1"):
        return [in_features] * 3 + [out_features - 3 * in_features]
    if out_features % parts:
        raise ValueError(f"{target}: {out_features} rows do not split into {parts} equal parts")
    return [out_features // parts] * parts


def split_param(name: str) -> tuple[str, str]:
    """`a.b.weight` -> (`a.b`, `weight`)."""
    module, _, param = name.rpartition(".")
    return module, param


B = r"transformer_blocks\.(\d+)"
S = r"single_transformer_blocks\.(\d+)"

# diffusers FluxTransformer2DModel -> ours (BFL names). The one place this geometry is written down.
DIFFUSERS_TRANSFORMER = [
    Rule("x_embedder", "img_in"),
    Rule("context_embedder", "txt_in"),
    Rule(r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    Rule(r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    Rule(r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
    Rule(r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
    Rule(r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    Rule(r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    Rule(rf"{B}\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
    Rule(rf"{B}\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
    Rule(rf"{B}\.attn\.to_q", r"double_blocks.\1.img_attn.qkv", 0, 3),
    Rule(rf"{B}\.attn\.to_k", r"double_blocks.\1.img_attn.qkv", 1, 3),
    Rule(rf"{B}\.attn\.to_v", r"double_blocks.\1.img_attn.qkv", 2, 3),
    Rule(rf"{B}\.attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv", 0, 3),
    Rule(rf"{B}\.attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv", 1, 3),
    Rule(rf"{B}\.attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv", 2, 3),
    Rule(rf"{B}\.attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm"),
    Rule(rf"{B}\.attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm"),
    Rule(rf"{B}\.attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm"),
    Rule(rf"{B}\.attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm"),
    Rule(rf"{B}\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    Rule(rf"{B}\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    Rule(rf"{B}\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.layers.0"),
    Rule(rf"{B}\.ff\.net\.2", r"double_blocks.\1.img_mlp.layers.2"),
    Rule(rf"{B}\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.layers.0"),
    Rule(rf"{B}\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.layers.2"),
    Rule(rf"{S}\.attn\.to_q", r"single_blocks.\1.linear1", 0, 4),
    Rule(rf"{S}\.attn\.to_k", r"single_blocks.\1.linear1", 1, 4),
    Rule(rf"{S}\.attn\.to_v", r"single_blocks.\1.linear1", 2, 4),
    Rule(rf"{S}\.proj_mlp", r"single_blocks.\1.linear1", 3, 4),
    Rule(rf"{S}\.proj_out", r"single_blocks.\1.linear2"),
    Rule(rf"{S}\.attn\.norm_q", r"single_blocks.\1.norm.query_norm"),
    Rule(rf"{S}\.attn\.norm_k", r"single_blocks.\1.norm.key_norm"),
    Rule(rf"{S}\.norm\.linear", r"single_blocks.\1.modulation.lin"),
    Rule(r"norm_out\.linear", "final_layer.adaLN_modulation.layers.1", swap_halves=True),
    Rule("proj_out", "final_layer.linear"),
]

# BFL single files (flux1-dev/schnell.safetensors, and BFL-named LoRAs) -> ours: MLX spelling only.
BFL_TRANSFORMER = [
    Rule(r"(double_blocks\.\d+\.(?:img|txt)_mlp)\.(\d)", r"\1.layers.\2"),
    Rule(r"final_layer\.adaLN_modulation\.1", "final_layer.adaLN_modulation.layers.1"),
    Rule(r"(.*)", r"\1"),
]

# Text encoders (transformers layout, any version) -> ours. FLUX.1's CLIP file was saved by
# transformers 4 (`text_model.` prefix); transformers 5 saves without it.
DIFFUSERS_CLIP = [Rule(r"text_model\.(.*)", r"\1"), Rule(r"(.*)", r"\1")]
DIFFUSERS_T5 = [Rule(r"encoder\.embed_tokens", "shared"), Rule(r"(.*)", r"\1")]
DIFFUSERS_VAE = [Rule(r"(.*)", r"\1")]


def bfl_vae_table(num_up_blocks: int) -> list[Rule]:
    """BFL `ae.safetensors` (LDM names) -> ours (diffusers names).

    The LDM decoder numbers its up blocks from the output side (`up.0` runs last), diffusers from
    the input side, so the index is reversed; the count comes from the file's own keys.
    """
    resnet = r"(norm1|conv1|norm2|conv2)"
    rules = []
    for side in ("encoder", "decoder"):
        rules += [
            Rule(rf"{side}\.(conv_in|conv_out)", rf"{side}.\1"),
            Rule(rf"{side}\.norm_out", rf"{side}.conv_norm_out"),
            Rule(rf"{side}\.mid\.block_1\.{resnet}", rf"{side}.mid_block.resnets.0.\1"),
            Rule(rf"{side}\.mid\.block_2\.{resnet}", rf"{side}.mid_block.resnets.1.\1"),
            Rule(rf"{side}\.mid\.attn_1\.norm", rf"{side}.mid_block.attentions.0.group_norm"),
            Rule(rf"{side}\.mid\.attn_1\.(q|k|v)", rf"{side}.mid_block.attentions.0.to_\1"),
            Rule(rf"{side}\.mid\.attn_1\.proj_out", rf"{side}.mid_block.attentions.0.to_out.0"),
        ]
    rules += [
        Rule(rf"encoder\.down\.(\d+)\.block\.(\d+)\.{resnet}", r"encoder.down_blocks.\1.resnets.\2.\3"),
        Rule(r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut", r"encoder.down_blocks.\1.resnets.\2.conv_shortcut"),
        Rule(r"encoder\.down\.(\d+)\.downsample\.conv", r"encoder.down_blocks.\1.downsamplers.0.conv"),
    ]
    for i in range(num_up_blocks):
        j = num_up_blocks - 1 - i
        rules += [
            Rule(rf"decoder\.up\.{i}\.block\.(\d+)\.{resnet}", rf"decoder.up_blocks.{j}.resnets.\1.\2"),
            Rule(rf"decoder\.up\.{i}\.block\.(\d+)\.nin_shortcut", rf"decoder.up_blocks.{j}.resnets.\1.conv_shortcut"),
            Rule(rf"decoder\.up\.{i}\.upsample\.conv", rf"decoder.up_blocks.{j}.upsamplers.0.conv"),
        ]
    return rules


# BFL norms are `.scale`; MLX's RMSNorm calls it `.weight`.
BFL_PARAM_RENAMES = {"scale": "weight"}
