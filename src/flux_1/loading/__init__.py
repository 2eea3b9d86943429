"""Reading weights: one name table per source format (tables.py), the strict lazy engine (weights.py),
local folders in the diffusers/BFL layouts (folder.py), save.py folders (saved.py), GGUF files (gguf.py),
the Hub (hub.py)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


def load_component(root: Path, component: str, dtype: mx.Dtype, spec=None,
                   gguf_files: dict[str, Path] | None = None) -> nn.Module:
    """One component (transformer, t5, clip, vae) from any local folder layout, quantized with `spec`
    (a `quantization.QuantSpec`; a save.py folder's own quantization wins). `gguf_files` ({component:
    file}, see `gguf.resolve_files`) loads those components from GGUF files instead (their quantized
    tensors keep the GGUF's quantization; `spec` applies to their float layers)."""
    from .folder import load_folder_component
    from .saved import is_saved_folder, load_saved_component

    if gguf_files and component in gguf_files:
        from .gguf import load_gguf_component

        return load_gguf_component(gguf_files[component], component, dtype, spec)
    load = load_saved_component if is_saved_folder(root) else load_folder_component
    return load(Path(root), component, dtype, spec)


def component_shapes(root: Path, component: str, gguf_files: dict[str, Path] | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Our-named, logical (unpacked) weight shapes of one component from any layout, read off the file
    headers only: what `load_component` would build, without loading it."""
    from .folder import find_source
    from .saved import is_saved_folder, logical_shapes
    from .weights import shapes_of

    if gguf_files and component in gguf_files:
        from .gguf import gguf_shapes

        return gguf_shapes(gguf_files[component], component)
    if is_saved_folder(root):
        return logical_shapes(Path(root), component)
    source = find_source(Path(root), component)
    return source.shapes or shapes_of(source.weights)
