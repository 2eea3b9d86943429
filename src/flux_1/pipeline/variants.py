"""The FLUX.1 model aliases and what differs between them: one entry per alias, read everywhere.

Nothing outside this table tests `alias == "dev"`: code asks the variant (default steps and guidance,
T5 length, Hub repo, which image conditioning it takes) or the loaded transformer (whether it has a
guidance embedder, how many input channels its img_in takes).

Conditioning (how an input image reaches the transformer, see pipeline/conditioning.py):
- "none": text to image; an optional `image_path` starts from the encoded image (img2img).
- "reference": Kontext; the encoded image's tokens are appended to the sequence (position axis 0 = 1).
- "fill": Fill; masked-image latents (64) and the packed mask (256) are concatenated to the latents.
- "control": Canny/Depth; the encoded control image's latents (64) are concatenated to the latents.

Defaults are those of diffusers' pipeline docstrings (0.42.1), which follow BFL's demos: Kontext 28 steps
and guidance 2.5 (FluxKontextPipeline); Fill 50 steps, guidance 30 (FluxFillPipeline); Canny 50 steps,
guidance 30 (FluxControlPipeline); Depth 50 steps, guidance 10 (BFL's cli_control.py default for depth).
"""

from __future__ import annotations

from dataclasses import dataclass

CONDITIONINGS = ("none", "reference", "fill", "control")
# img_in's width per conditioning: 64 latent channels, plus 64 masked-image + 256 mask (Fill) or 64 control.
INPUT_CHANNELS = {"none": 64, "reference": 64, "fill": 384, "control": 128}


@dataclass(frozen=True)
class Variant:
    alias: str
    repo_id: str  # Hugging Face Hub repository (diffusers layout)
    default_steps: int
    max_sequence_length: int  # T5 tokens, as in the reference pipelines
    guidance_distilled: bool  # has a guidance embedder (dev) or not (schnell)
    default_guidance: float = 3.5  # used only when guidance_distilled
    conditioning: str = "none"  # see the module docstring
    # image_strength when an image is given and none is asked (mflux's meaning: the fraction of the
    # schedule skipped); None: the variant takes no image_strength.
    default_image_strength: float | None = None

    @property
    def in_channels(self) -> int:
        """img_in's width in this variant's own checkpoint."""
        return INPUT_CHANNELS[self.conditioning]


VARIANTS: dict[str, Variant] = {
    v.alias: v
    for v in (
        Variant("schnell", "black-forest-labs/FLUX.1-schnell", 4, 256, guidance_distilled=False,
                default_image_strength=0.4),
        Variant("dev", "black-forest-labs/FLUX.1-dev", 25, 512, guidance_distilled=True,
                default_image_strength=0.4),
        Variant("dev-kontext", "black-forest-labs/FLUX.1-Kontext-dev", 28, 512, guidance_distilled=True,
                default_guidance=2.5, conditioning="reference"),
        # strength 1 in diffusers (the default): pure noise, the image reaches the model only masked.
        Variant("dev-fill", "black-forest-labs/FLUX.1-Fill-dev", 50, 512, guidance_distilled=True,
                default_guidance=30.0, conditioning="fill", default_image_strength=0.0),
        Variant("dev-canny", "black-forest-labs/FLUX.1-Canny-dev", 50, 512, guidance_distilled=True,
                default_guidance=30.0, conditioning="control"),
        Variant("dev-depth", "black-forest-labs/FLUX.1-Depth-dev", 50, 512, guidance_distilled=True,
                default_guidance=10.0, conditioning="control"),
    )
}


def variant(alias: str) -> Variant:
    if alias not in VARIANTS:
        raise ValueError(f"unknown model {alias!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[alias]
