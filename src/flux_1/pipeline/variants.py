"""The FLUX.1 model aliases and what differs between them: one entry per alias, read everywhere.

Nothing outside this table tests `alias == "dev"`: code asks the variant (default steps, T5 length,
Hub repo) or the loaded transformer (whether it has a guidance embedder).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    alias: str
    repo_id: str  # Hugging Face Hub repository (diffusers layout)
    default_steps: int
    max_sequence_length: int  # T5 tokens, as in the reference pipelines
    guidance_distilled: bool  # has a guidance embedder (dev) or not (schnell)
    default_guidance: float = 3.5  # used only when guidance_distilled


VARIANTS: dict[str, Variant] = {
    v.alias: v
    for v in (
        Variant("schnell", "black-forest-labs/FLUX.1-schnell", 4, 256, guidance_distilled=False),
        Variant("dev", "black-forest-labs/FLUX.1-dev", 25, 512, guidance_distilled=True),
    )
}


def variant(alias: str) -> Variant:
    if alias not in VARIANTS:
        raise ValueError(f"unknown model {alias!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[alias]
