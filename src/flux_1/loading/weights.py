"""Strict, lazy weight loading shared by every source format.

`mx.load` maps safetensors lazily: nothing is read until an array is evaluated. So a component is
loaded as: lazy source tensors -> renamed/fused by the format's table (still lazy, shapes known, so
the architecture is read off them) -> assigned module by module, evaluating one module at a time.
Peak memory while loading is the model itself plus one layer, whatever the shard sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .tables import Rule, resolve, split_param


class WeightLoadError(RuntimeError):
    """A checkpoint does not fit the model: names the file, the key and what was expected."""


SHARD_STEMS = ("diffusion_pytorch_model", "model")


def component_files(folder: Path, component: str | None = None) -> list[Path]:
    """The safetensors files of one component folder, following a sharded index when present."""
    label = f"{component}/" if component else str(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"missing component folder {label} in {folder.parent}")
    for stem in SHARD_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightLoadError(f"{index}: unreadable shard index ({e})") from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise WeightLoadError(f"{index} lists {f.name}, which is missing (incomplete download?)")
            return files
        single = folder / f"{stem}.safetensors"
        if single.exists():
            return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise WeightLoadError(f"no .safetensors weights in {label} ({folder})")


def read_lazy(files: list[Path]) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Lazily map every tensor of the files; also return which file each key came from."""
    tensors: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            shard = mx.load(str(f))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise WeightLoadError(f"{f}: unreadable or truncated safetensors file ({e})") from e
        for k, v in shard.items():
            if k in tensors:
                raise WeightLoadError(f"{f}: key '{k}' also appears in {origin[k]}")
            tensors[k] = v
            origin[k] = f
    return tensors, origin


def convert(
    tensors: dict[str, mx.array],
    origin: dict[str, Path],
    table: list[Rule],
    param_renames: dict[str, str] | None = None,
) -> dict[str, mx.array]:
    """Source names -> our names with one format table; fused parts are concatenated (lazily)."""
    param_renames = param_renames or {}
    out: dict[str, mx.array] = {}
    pending: dict[str, dict[int, mx.array]] = {}
    expected_parts: dict[str, int] = {}
    sources: dict[str, list[str]] = {}
    for name, value in tensors.items():
        module, param = split_param(name)
        r = resolve(table, module)
        if r is None:
            raise WeightLoadError(f"{origin[name]}: unexpected key '{name}' (no rule maps it onto the model)")
        if r.swap_halves:
            a, b = mx.split(value, 2, axis=0)
            value = mx.concatenate([b, a], axis=0)
        ours = f"{r.target}.{param_renames.get(param, param)}"
        if r.parts == 1:
            if ours in out:
                raise WeightLoadError(f"{origin[name]}: '{name}' maps onto '{ours}', which is already set")
            out[ours] = value
            continue
        pending.setdefault(ours, {})[r.part] = value
        expected_parts[ours] = r.parts
        sources.setdefault(ours, []).append(name)
    for ours, parts in pending.items():
        if len(parts) != expected_parts[ours]:
            have = ", ".join(sources[ours])
            missing = sorted(set(range(expected_parts[ours])) - set(parts))
            raise WeightLoadError(
                f"missing part(s) {missing} of fused '{ours}' (found only: {have}); truncated checkpoint?"
            )
        out[ours] = mx.concatenate([parts[i] for i in range(len(parts))], axis=0)
    return out


def to_mlx_layout(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Torch conv weights (O, I, kH, kW) -> MLX (O, kH, kW, I)."""
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}


def shapes_of(weights: dict[str, mx.array]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def assign(
    model: nn.Module,
    weights: dict[str, mx.array],
    dtype: mx.Dtype,
    label: str,
    prepare: Callable[[str, mx.array, nn.Module], dict[str, mx.array]] | None = None,
) -> None:
    """Set every parameter of `model` from `weights`, strictly, evaluating module by module.

    `prepare(module_name, weight, module)` may turn one incoming full-precision weight into the
    module's own parameters (quantizing while loading); by default a weight is cast to `dtype`.
    `weights` is consumed: each module's entries are removed as it loads, so an evaluated source
    tensor (a full-precision layer that was quantized or cast) is freed at once, not kept to the end.
    """
    expected = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise WeightLoadError(f"{label}: unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    by_module: dict[str, dict[str, mx.array]] = {}
    for name, value in weights.items():
        module, param = split_param(name)
        by_module.setdefault(module, {})[param] = value
    weights.clear()  # from here by_module holds the only references, dropped module by module

    loaded: set[str] = set()
    for module_name in list(by_module):
        params = by_module.pop(module_name)
        module = modules[module_name]
        if prepare is not None and "weight" in params:
            ready = prepare(module_name, params["weight"], module)
            params = {**{k: v for k, v in params.items() if k != "weight"}, **ready}
        new = {}
        for param, value in params.items():
            key = f"{module_name}.{param}"
            want = expected.get(key)
            if want is None:
                raise WeightLoadError(f"{label}: unexpected key '{key}'")
            if value.ndim == 4 and want.ndim == 2 and value.shape[1:3] == (1, 1):
                value = value.reshape(value.shape[0], value.shape[3])  # 1x1 conv stored for a linear
            if tuple(value.shape) != tuple(want.shape):
                raise WeightLoadError(
                    f"{label}: '{key}' has shape {tuple(value.shape)}, expected {tuple(want.shape)}"
                )
            if mx.issubdtype(value.dtype, mx.floating) and mx.issubdtype(want.dtype, mx.floating):
                value = value.astype(want.dtype if _keeps_dtype(module, param) else dtype)
            new[param] = value
            loaded.add(key)
        module.update(new)
        mx.eval(list(new.values()))
    missing = sorted(set(expected) - loaded)
    if missing:
        raise WeightLoadError(f"{label}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _keeps_dtype(module: nn.Module, param: str) -> bool:
    # Quantization scales/biases keep the dtype they were made in.
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and param in ("scales", "biases")
