"""Folders written by save.py: our names, MLX layout, self-describing quantization. See docs/QUANTIZATION.md.

Layout (format version 1):
```
OUT/manifest.json                  model alias, source, LoRAs baked (and scales), package and format
                                   version, precision, quantization (or null), per-component files
OUT/transformer/                   model.safetensors, or model-0000i-of-0000n.safetensors (each at most
OUT/text_encoder/   (CLIP)           2 GB) + model.safetensors.index.json
OUT/text_encoder_2/ (T5)
OUT/vae/
OUT/tokenizer/  OUT/tokenizer_2/   copied from the source
```
Tensors carry our parameter names (`tree_flatten(model.parameters())`), so loading needs no name table;
a quantized layer stores `weight` (uint32 codes), `scales` and (affine) `biases`. Every shard's
safetensors metadata says the format and version, the component, precision, bits, group size, mode and
the exact layer plan (`layers`: JSON `{module: {group_size, bits, mode}}`). Loading reads the plan, not
the policy: a later change of policy cannot break an old folder (mflux issue #149). The plan quantizes the
skeleton before the codes are loaded (`folder.build(..., plan=...)`).

Saving is atomic: everything is written into a hidden folder next to OUT, which is renamed to OUT only
when complete; an interrupted save leaves OUT as it was (and no partial folder).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import quantization as q
from ..components import COMPONENTS, TOKENIZERS, require_tokenizers
from .weights import WeightLoadError, component_files, read_lazy

MANIFEST = "manifest.json"
FORMAT = "flux_1.saved"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_SHARD_BYTES = 2 * 10**9  # at most 2 GB per file (as mflux / mlx-examples shard)
INDEX = "model.safetensors.index.json"


class SavedFormatError(WeightLoadError):
    """A saved folder this version cannot read (unknown format version, inconsistent metadata)."""


class SaveError(ValueError):
    """A save that must not start (existing output, output inside the source...)."""


def is_saved_folder(root: Path) -> bool:
    return (Path(root) / MANIFEST).exists()


def read_manifest(root: Path) -> dict:
    """The manifest of a saved folder, checked: a folder of another format version is refused."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SavedFormatError(f"{root} is not a saved model folder (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise SavedFormatError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedFormatError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})"
                               if isinstance(manifest, dict) else f"{path}: not a {FORMAT} manifest")
    _check_version(manifest.get("format_version"), str(path))
    return manifest


def _check_version(version, where: str) -> None:
    if version not in SUPPORTED_VERSIONS and str(version) not in map(str, SUPPORTED_VERSIONS):
        raise SavedFormatError(
            f"{where}: saved-model format version {version!r} is not supported by this flux_1 "
            f"(it reads version {', '.join(map(str, SUPPORTED_VERSIONS))}); re-save the model with this "
            f"version's save.py, or use the flux_1 version that wrote it"
        )


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, {tensor: {dtype, shape, data_offsets}}) of a safetensors file, from its JSON header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise WeightLoadError(f"{path}: unreadable safetensors header ({e})") from e
    return header.pop("__metadata__", {}) or {}, header


# ------------------------------------------------------------------------------------------------
# Loading


_warned: set[tuple] = set()


def component_metadata(root: Path, component: str) -> tuple[list[Path], dict[str, str]]:
    """The files of a saved component and their (identical) metadata, checked."""
    folder = Path(root) / COMPONENTS[component].folder
    files = component_files(folder, COMPONENTS[component].folder)
    first = None
    for f in files:
        meta, _ = read_header(f)
        if meta.get("format") != FORMAT:
            raise SavedFormatError(f"{f}: not written by save.py (no '{FORMAT}' metadata)")
        _check_version(meta.get("format_version"), str(f))
        if meta.get("component") != component:
            raise SavedFormatError(f"{f}: holds component {meta.get('component')!r}, expected {component!r}")
        if first is None:
            first = meta
        elif {k: meta.get(k) for k in ("layers", "bits", "mode", "precision")} != {
                k: first.get(k) for k in ("layers", "bits", "mode", "precision")}:
            raise SavedFormatError(f"{f}: its quantization metadata differs from {files[0].name}'s")
    return files, first


def check_folder(root: Path) -> dict:
    """Everything about a saved folder that can be checked without loading it (manifest, format version,
    each component's files and metadata, the tokenizers); returns the manifest."""
    manifest = read_manifest(root)
    for component in COMPONENTS:
        component_metadata(root, component)
    require_tokenizers(root)
    return manifest


def load_saved_component(root: Path, component: str, dtype: mx.Dtype, spec: q.QuantSpec | None = None
                         ) -> nn.Module:
    """Build one component from a saved folder; its quantization comes from the folder.

    A folder saved quantized keeps its own quantization: a `spec` that disagrees is a warning and the
    saved bits win. A folder saved in full precision is like any other source: `spec` quantizes it
    while loading.
    """
    from .folder import Source, build

    root = Path(root)
    manifest = read_manifest(root)
    files, meta = component_metadata(root, component)
    try:
        plan = json.loads(meta.get("layers", "{}"))
        for how in plan.values():
            q.QuantSpec(bits=int(how["bits"]), group_size=int(how["group_size"]), mode=how["mode"])
        saved = manifest.get("quantization")
        saved_spec = q.QuantSpec.from_dict(saved) if saved else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SavedFormatError(f"{files[0]}: unreadable quantization metadata ({e!r})") from e
    disagrees = saved_spec is not None and spec is not None and (spec.bits, spec.mode) != (
        saved_spec.bits, saved_spec.mode)
    if disagrees:
        key = (str(root.resolve()), spec, saved_spec)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{root} is saved quantized ({saved_spec.description}): ignoring -q {spec.label}, "
                          f"the saved quantization is used", stacklevel=2)
    tensors, _ = read_lazy(files)
    label = str(root / COMPONENTS[component].folder)
    shapes = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".")
        how = plan.get(module) if param == "weight" else None
        if how is not None and value.dtype != mx.uint32:
            raise SavedFormatError(f"{label}: the layer plan quantizes '{module}' but its weight is "
                                   f"{value.dtype}, not packed codes (mismatched metadata)")
        shapes[key] = q.logical_shape(tuple(value.shape), how["bits"]) if how else tuple(value.shape)
    source = Source(tensors, label, shapes)
    del tensors
    try:
        if plan or saved_spec is not None:  # the saved plan decides (an empty plan: kept full precision)
            return build(component, source, dtype, None, plan=plan)
        return build(component, source, dtype, spec)  # a full-precision folder: like any other source
    except KeyError as e:
        raise WeightLoadError(f"{label}: missing key {e} (incomplete or foreign saved folder?)") from e
    except ValueError as e:  # a plan naming layers this model does not have
        raise WeightLoadError(f"{label}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Writing


def shard_keys(arrays: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Split keys into files of at most `max_bytes` each, keeping a module's tensors together
    (a single module larger than the limit gets a file of its own)."""
    modules: dict[str, list[str]] = {}
    for key in arrays:
        modules.setdefault(key.rpartition(".")[0], []).append(key)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in modules.values():
        n = sum(arrays[k].nbytes for k in keys)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += n
    return shards


def component_file_metadata(component: str, plan: dict[str, dict], precision: str) -> dict[str, str]:
    spec = q.plan_spec(plan)
    from .. import __version__

    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "component": component,
        "precision": precision,
        "bits": str(spec.bits) if spec else "none",
        "group_size": str(spec.group_size) if spec else "none",
        "mode": spec.mode if spec else "none",
        "layers": json.dumps(plan, sort_keys=True, separators=(",", ":")),
        "flux_1_version": __version__,
    }


def write_component(folder: Path, component: str, model: nn.Module, precision: str,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write one loaded (possibly quantized) model into `folder`; returns its manifest entry."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = q.describe(model)
    arrays = dict(tree_flatten(model.parameters()))
    meta = component_file_metadata(component, plan, precision)
    shards = shard_keys(arrays, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, keys in zip(names, shards, strict=True):
        mx.save_safetensors(str(folder / name), {k: arrays[k] for k in keys}, metadata=meta)
    total = sum(a.nbytes for a in arrays.values())
    if len(shards) > 1:
        index = {"metadata": {**meta, "total_size": str(total)},
                 "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys}}
        (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return {"folder": folder.name, "files": names, "tensor_bytes": total, "quantized_layers": len(plan)}


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output that exists and is not an empty folder (unless `overwrite`), or that would
    replace the source being read."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaveError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SaveError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    if source is not None:
        o, s = out.resolve(), Path(source).resolve()
        if o == s or o in s.parents or s in o.parents:
            raise SaveError(f"output {out} would overwrite or nest inside the source {source}")


def write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a fresh hidden folder next to `out`, then move it into place.

    On any exception (or Ctrl-C) the partial folder is removed and `out` is untouched. With
    `overwrite`, an existing `out` is swapped out only after the new folder is complete.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        fill(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_manifest(folder: Path, alias: str, source: str, precision: str, spec: q.QuantSpec | None,
                   lora_paths: list[str], scales: list[float], components: dict) -> None:
    from .. import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": alias,
        "source": source,
        "flux_1_version": __version__,
        "mlx_version": mx.__version__,
        "precision": precision,
        "quantization": spec.as_dict() if spec else None,
        "loras": [{"path": str(Path(p).resolve()), "name": Path(p).name, "scale": s}
                  for p, s in zip(lora_paths, scales, strict=True)],
        "components": components,
        "tokenizers": list(TOKENIZERS),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
