"""The quantization size tables of README.md and docs/QUANTIZATION.md, from the real FLUX.1 shapes.

`python -m bench.sizes` prints them (schnell and dev). Nothing is downloaded or allocated: the
full-size models are built from their default params (FLUX.1's values) and quantized as the policy
says, but never evaluated (MLX arrays are lazy), so only shapes and dtypes are read.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from flux_1 import quantization as q
from flux_1.components import COMPONENTS


def full_size_model(component: str, guidance: bool = False) -> nn.Module:
    facts = COMPONENTS[component]
    params = facts.params(guidance_embed=guidance) if component == "transformer" else facts.params()
    return facts.model(params)


TABLE_SETTINGS = ("bf16", "8", "6", "5", "4", "3", "mxfp8", "mxfp4", "nvfp4")


def size_table(settings=TABLE_SETTINGS, dtype: mx.Dtype = mx.bfloat16, guidance: bool = False
               ) -> dict[str, dict[str, int]]:
    """{component or "pipeline": {setting: bytes}} for the real FLUX.1 models under the policy.

    Full-precision tensors count at `dtype` (bf16). `guidance=True` is FLUX.1-dev (the guidance
    embedder, 10.6M parameters more than schnell). Bytes are tensor data, what save.py writes less the
    small safetensors headers.
    """
    table: dict[str, dict[str, int]] = {c: {} for c in (*COMPONENTS, "pipeline")}
    for setting in settings:
        spec = None if setting in ("bf16", "fp16", "none") else q.parse(setting)
        for component in COMPONENTS:
            model = full_size_model(component, guidance)
            model.set_dtype(dtype)
            q.quantize_skeleton(model, q.layer_plan(model, component, spec))
            table[component][setting] = q.parameter_bytes(model)
            del model
        table["pipeline"][setting] = sum(table[c][setting] for c in COMPONENTS)
    return table


# mflux's published whole-pipeline sizes (README v0.10+), GB.
MFLUX_SIZES_GB = {"bf16": 33.73, "8": 18.01, "6": 13.81, "5": 11.71, "4": 9.61, "3": 7.52}
ROW_NAMES = {"transformer": "transformer", "t5": "T5-XXL (text_encoder_2)", "clip": "CLIP-L (text_encoder)",
             "vae": "VAE", "pipeline": "**whole pipeline**"}


def format_size_table(table: dict[str, dict[str, int]]) -> str:
    """Markdown: one row per component, one column per setting, GB (10^9 bytes); mflux's figures below."""
    settings = list(table["pipeline"])

    def row(name: str, cells) -> str:
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = [row("component", (s if s in q.FIXED_GROUP or s == "bf16" else f"{s}-bit" for s in settings)),
             "|---|" + "---:|" * len(settings)]
    for name, values in table.items():
        lines.append(row(ROW_NAMES.get(name, name), (f"{values[s] / 1e9:.2f}" for s in settings)))
    mflux = (f"{MFLUX_SIZES_GB[s]:.2f}" if s in MFLUX_SIZES_GB else "–" for s in settings)
    lines.append(row("mflux README (whole pipeline)", mflux))
    return "\n".join(lines)


def size_report() -> str:
    """The markdown tables of docs/QUANTIZATION.md (schnell and dev)."""
    parts = []
    for dev in (False, True):
        title = f"FLUX.1-{'dev' if dev else 'schnell'}, GB (10^9 bytes)"
        parts.append(f"{title}\n\n{format_size_table(size_table(guidance=dev))}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(size_report())
