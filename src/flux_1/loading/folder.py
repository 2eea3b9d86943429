"""Load FLUX.1 components from a local folder: the diffusers layout, BFL single files, or save.py.

Layouts (checked in this order, per component):
- save.py folders: `manifest.json` at the root; our names, possibly pre-quantized (see saved.py);
- diffusers: `transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/` (sharded, any float dtype);
- BFL single files: `flux1-dev.safetensors` / `flux1-schnell.safetensors` (any root file with
  `double_blocks` keys) and `ae.safetensors`; text encoders still come from the diffusers folders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import quantization as q
from ..components import COMPONENTS
from ..safetensors_check import HeaderError, check_header
from . import tables
from .weights import (
    WeightLoadError,
    assign,
    check_floats,
    component_files,
    convert,
    read_lazy,
    shapes_of,
    to_mlx_layout,
)

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class Source:
    """Where one component's weights come from, already mapped to our names (lazily)."""

    weights: dict[str, mx.array]
    label: str  # for error messages: the folder or file
    shapes: dict[str, tuple[int, ...]] | None = None  # unpacked shapes, when weights are pre-quantized
    names: dict[str, str] = field(default_factory=dict)  # our key -> source key(s) and file, for messages


def _torch_source(files: list[Path], table, label: str, renames=None, ignore=None, strip=()) -> Source:
    tensors, origin = read_lazy(files)
    if strip:
        def unprefixed(k: str) -> str:
            return next((k[len(p):] for p in strip if k.startswith(p)), k)

        tensors = {unprefixed(k): v for k, v in tensors.items()}
        origin = {unprefixed(k): v for k, v in origin.items()}
    if ignore is not None:
        keys = set(tensors)
        tensors = {k: v for k, v in tensors.items() if not ignore(k, keys)}
    check_floats(tensors, origin)
    names: dict[str, str] = {}
    weights = convert(tensors, origin, table, renames, names)
    return Source(to_mlx_layout(weights), label, names=names)


def _header_keys(f: Path) -> list[str]:
    """Tensor names from the header alone (nothing is mapped; a FIFO or directory is refused, not opened)."""
    try:
        return [k for k in check_header(f) if k != "__metadata__"]
    except HeaderError as e:
        raise WeightLoadError(str(e)) from e


def bfl_transformer_file(root: Path) -> Path | None:
    for name in ("flux1-dev.safetensors", "flux1-schnell.safetensors"):
        if (root / name).exists():
            return root / name
    for f in sorted(root.glob("*.safetensors")):
        if f.name != "ae.safetensors":
            try:
                keys = _header_keys(f)
            except WeightLoadError:  # some other, broken file: not ours to judge
                continue
            if any("double_blocks." in k for k in keys):
                return f
    return None


def find_source(root: Path, component: str) -> Source:
    """The weights of one component under `root`, in our names, from whichever layout is there."""
    root = Path(root)
    if not root.is_dir():
        raise WeightLoadError(f"model path {root} does not exist or is not a folder")
    folder = root / COMPONENTS[component].folder
    if component == "transformer" and not folder.is_dir():
        single = bfl_transformer_file(root)
        if single is not None:
            return _torch_source([single], tables.BFL_TRANSFORMER, str(single), tables.BFL_PARAM_RENAMES,
                                 strip=BFL_PREFIXES)
    if component == "vae" and not folder.is_dir() and (root / "ae.safetensors").exists():
        ae = root / "ae.safetensors"
        ups = {m.group(1) for k in _header_keys(ae) if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
        return _torch_source([ae], tables.bfl_vae_table(len(ups)), str(ae))
    files = component_files(folder, COMPONENTS[component].folder)
    label = str(folder)
    if component == "transformer":
        return _torch_source(files, tables.DIFFUSERS_TRANSFORMER, label)
    if component == "vae":
        return _torch_source(files, tables.DIFFUSERS_VAE, label)
    if component == "clip":
        return _torch_source(files, tables.DIFFUSERS_CLIP, label, ignore=lambda k, _: k.endswith("position_ids"))
    # transformers may save T5's tied embedding twice: keep `shared` when both are present.
    return _torch_source(files, tables.DIFFUSERS_T5, label,
                         ignore=lambda k, keys: k == "encoder.embed_tokens.weight" and "shared.weight" in keys)


def build(component: str, source: Source, dtype: mx.Dtype, spec: q.QuantSpec | None = None,
          plan: dict[str, dict] | None = None) -> nn.Module:
    """Read the architecture off the weights, build the model, (quantize the skeleton,) load strictly.

    `plan` (from a saved folder) fixes exactly which layers are quantized and how; otherwise `spec`
    applies the policy of quantization.py.
    """
    try:
        model = COMPONENTS[component].build(source.shapes or shapes_of(source.weights))
    except KeyError as e:  # a tensor the architecture is read from
        key = e.args[0]
        raise WeightLoadError(f"{source.label}: missing key '{key}'{_source_hint(source, key)}, which the "
                              f"{component} architecture is read from (truncated or foreign checkpoint?)") from e
    except ValueError as e:  # tensors that disagree on a width; from_shapes quotes our keys
        raise WeightLoadError(f"{source.label}: {_with_source_names(str(e), source)}") from e
    model.set_dtype(dtype)
    if plan is None and spec is not None:
        plan = q.layer_plan(model, component, spec)
    q.quantize_skeleton(model, plan or {})
    prepare: Callable = lambda name, w, m: q.quantize_on_load(name, w, m, dtype)  # noqa: E731
    assign(model, source.weights, dtype, source.label, prepare, source.names)
    return model


def _source_hint(source: Source, key: str) -> str:
    return f" (from {source.names[key]})" if key in source.names else ""


def _with_source_names(message: str, source: Source) -> str:
    """Our quoted keys in a from_shapes message, each followed by the source tensor it was read from."""
    return re.sub(r"'([\w.]+)'", lambda m: m.group(0) + _source_hint(source, m.group(1)), message)


def load_folder_component(root: Path, component: str, dtype: mx.Dtype, spec: q.QuantSpec | None = None
                          ) -> nn.Module:
    """One component from a diffusers-layout or BFL folder."""
    return build(component, find_source(root, component), dtype, spec)
