"""Saving a model: load (from a folder or the Hub), merge LoRAs, quantize, write a save.py folder.

The folder format itself (layout, metadata, reading, atomic writing) is `loading/saved.py`; this module
only orchestrates, one component in memory at a time. Used by `flux1-save` (cli/save.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import quantization as q
from ..components import COMPONENTS, TOKENIZERS, precision_dtype, require_tokenizers
from ..loading import load_component
from ..loading.saved import (
    MAX_SHARD_BYTES,
    SaveError,
    check_output,
    copy_folder,
    is_saved_folder,
    mixed_quantization,
    read_manifest,
    write_atomically,
    write_component,
    write_manifest,
)
from ..lora import LoRAStack, bake, lora_strengths
from .variants import variant


def save_model(out: str | Path, model: str, source: str | Path | None = None, quantize=None,
         precision: str = "bfloat16", lora_paths: list[str] | None = None,
         lora_scales: list[float] | None = None, overwrite: bool = False,
         max_shard_bytes: int = MAX_SHARD_BYTES, log: Callable[[str], None] | None = None,
         transformer_gguf: str | Path | None = None, t5_gguf: str | Path | None = None) -> Path:
    """Write FLUX.1-`model` (any alias of variants.py) from `source` (a local folder; None: the Hub) into `out`,
    quantized with `quantize` (bits or mode; None: full precision), LoRAs merged in first.

    Each component is loaded, written and released in turn. Without LoRAs it is quantized while
    loading (peak memory: the largest quantized component plus a layer). The components LoRAs touch
    (transformer, CLIP) are loaded in full precision, the LoRAs merged into their weights, and only
    then quantized, layer by layer (peak: the full-precision transformer); never into quantized codes.

    GGUF: `source` may be a transformer `.gguf` file (the other components then come from the Hub), or a
    folder holding one; `transformer_gguf` / `t5_gguf` name GGUF files beside a normal source folder.
    Their per-layer quantization is written as it is (a mixed plan, reloaded bit-exactly); `quantize`
    applies to their float layers only. LoRAs cannot be baked into a GGUF's quantized layers.
    """
    log = log or (lambda _msg: None)
    alias = variant(model).alias
    dtype = precision_dtype(precision)
    spec = q.parse(quantize)
    lora_paths = [str(p) for p in (lora_paths or [])]
    scales = lora_strengths(lora_paths, lora_scales)
    for p in lora_paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"LoRA file {p} does not exist")
    out = Path(out)
    check_output(out, overwrite, Path(source) if source is not None else None, log=log)

    from ..loading import gguf

    if source is not None and gguf.is_gguf(source) and Path(source).is_file():
        transformer_gguf, source = source, None
    if source is None:
        from ..loading.hub import download

        root, source_label = download(variant(model).repo_id), variant(model).repo_id
    else:
        root, source_label = Path(source), str(Path(source).resolve())
        if not root.is_dir():
            raise FileNotFoundError(f"source {root} does not exist or is not a folder")
    check_output(out, overwrite, root)
    require_tokenizers(root)
    gguf_files = gguf.resolve_files(root, transformer_gguf, t5_gguf)
    if gguf_files:
        source_label = ", ".join([source_label, *(str(Path(f).resolve()) for f in gguf_files.values())])
    if lora_paths and "transformer" in gguf_files:
        raise SaveError(f"LoRAs cannot be baked into the quantized layers of {gguf_files['transformer']} (a GGUF); "
                        "save from full-precision weights, or apply the LoRAs when generating")
    if is_saved_folder(root):
        stored = read_manifest(root).get("quantization")
        if stored and stored.get("mode") == "mixed":
            raise SaveError(f"{root} is already saved with per-layer quantization (from a GGUF); use it as it is")
        if stored and (lora_paths or spec != q.QuantSpec.from_dict(stored)):
            raise SaveError(f"{root} is already quantized ({q.QuantSpec.from_dict(stored).description}); "
                            "save from the full-precision weights to change the quantization or bake LoRAs")

    def fill(tmp: Path) -> None:
        entries = {}
        plans = {}
        if lora_paths:
            entries = _write_with_loras(tmp, root, dtype, precision, spec, lora_paths, scales,
                                        max_shard_bytes, log, gguf_files)
        else:
            for component in COMPONENTS:
                quantizing = spec is not None and component != "vae"
                log(f"{component}: loading{f' and quantizing ({spec.description})' if quantizing else ''}")
                built = load_component(root, component, dtype, spec, gguf_files)
                plans[component] = q.describe(built)
                entries[component] = write_component(tmp / COMPONENTS[component].folder, component, built, precision,
                                                     max_shard_bytes)
                del built
                mx.clear_cache()
        for sub in TOKENIZERS:
            copy_folder(root / sub, tmp / sub)
        quantization = None
        if gguf_files:
            types = {c: gguf.gguf_types(f, c) for c, f in gguf_files.items()}
            quantization = mixed_quantization(plans, types) if any(plans.values()) else None
        write_manifest(tmp, alias, source_label, precision, None if quantization else spec, lora_paths, scales,
                       entries, quantization=quantization)

    log(f"writing {out}")
    return write_atomically(out, overwrite, fill, log=log)


def _write_with_loras(tmp, root, dtype, precision, spec, lora_paths, scales, max_shard_bytes, log,
                      gguf_files=None):
    """Transformer and CLIP: load in full precision, merge the LoRAs into the weights (in float32, one
    rounding to `precision`), then quantize layer by layer and write. T5 and the VAE (which LoRAs do not
    touch) are quantized while loading. One component is in memory at a time."""
    entries = {}
    stack = None
    for component in ("transformer", "t5", "clip", "vae"):
        touched = component in ("transformer", "clip")
        model = load_component(root, component, dtype, None if touched else spec, gguf_files)
        if component == "transformer":
            log(f"merging {len(lora_paths)} LoRA(s) into the full-precision weights")
            stack = LoRAStack.load(lora_paths, scales, model, None, merge=True, log=log)
        elif component == "clip":
            stack.apply_text_encoder(model)
        if touched:
            try:
                bake(model)  # each LoRA-wrapped layer becomes its plain layer with the merged weight
            except ValueError as e:
                raise SaveError(f"{component}: {e}") from e
            _check_plain(model, component)
            _check_finite(model, component, precision, "after merging the LoRAs")
            plan = q.layer_plan(model, component, spec)
            if plan:
                log(f"{component}: quantizing {len(plan)} layers ({spec.description})")
                q.quantize_loaded(model, plan)
                _check_finite(model, component, precision, "after quantizing the merged weights")
        entries[component] = write_component(tmp / COMPONENTS[component].folder, component, model, precision,
                                             max_shard_bytes)
        del model
        mx.clear_cache()
    return entries


def _check_plain(model: nn.Module, component: str) -> None:
    """After merging, a model must hold exactly its own parameters (no LoRA side paths left)."""
    expected = {k for k, _ in tree_flatten(COMPONENTS[component].model(model.params).parameters())}
    got = {k for k, _ in tree_flatten(model.parameters())}
    if got != expected:
        extra = sorted(got - expected)[:4]
        raise SaveError(f"{component}: after merging the LoRAs the model has parameters beyond its own "
                        f"({extra} ...): LoRAs must be merged into the weights before saving")


def _check_finite(model: nn.Module, component: str, precision: str, when: str) -> None:
    """Refuse to write a non-finite parameter: a LoRA at an extreme scale can overflow `precision`, and
    an inf or NaN saved into the folder would spoil every image made from it, for good."""
    for key, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            raise SaveError(f"{component}: '{key}' is not finite {when} (it overflows {precision}: a LoRA "
                            f"scale too large?); nothing was saved")
