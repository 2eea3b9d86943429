"""Strict, lazy weight loading shared by every source format.

`mx.load` maps safetensors lazily: nothing is read until an array is evaluated. So a component is
loaded as: lazy source tensors -> renamed/fused by the format's table (still lazy, shapes known, so
the architecture is read off them) -> assigned module by module, evaluating one module at a time.
Peak memory while loading is the model itself plus one layer, whatever the shard sizes.

Nothing that would give a silently wrong image gets through (each refusal is a WeightLoadError naming
the file and the tensor): every header is validated before `mx.load` trusts it (`safetensors_check`);
FP8 (E4M3) is decoded exactly, never used as raw integers; integer/bool tensors where a float weight
is expected, scaled-FP8 files and empty tensors are refused; and every float parameter is checked for
NaN/inf in the same evaluation that loads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..safetensors_check import HeaderError, check_header
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
            files = [folder / name for name in _shard_names(index)]
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


def _shard_names(index: Path) -> list[str]:
    """The shard file names a `*.safetensors.index.json` lists, each a plain name in its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # not JSON, not an object, no weight_map
        raise WeightLoadError(f"{index}: unreadable shard index ({e!r})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightLoadError(f"{index}: 'weight_map' must be a non-empty object of tensor -> file name")
    for key, name in weight_map.items():
        # A shard is a file beside the index: a path (`../x`, `/etc/x`, `a/b`) would read outside the folder.
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise WeightLoadError(f"{index}: weight_map['{key}'] is {name!r}, not a file name in {index.parent}")
    return list(dict.fromkeys(weight_map.values()))


# Tensor names of "scaled FP8" files (ComfyUI, TensorRT/modelopt): the codes must be multiplied by these.
SCALE_SUFFIXES = ("scale_weight", "weight_scale", "weight_scale_2", "scale_input", "input_scale", "scaled_fp8")


def _check_dtypes(f: Path, header: dict) -> list[str]:
    """Refuse what `mx.load` would misread; return the F8_E4M3 tensors (loaded as raw uint8 codes)."""
    fp8 = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if name.rpartition(".")[2] in SCALE_SUFFIXES:
            raise WeightLoadError(
                f"{f}: '{name}' marks a scaled-FP8 checkpoint (per-tensor scales, which this loader does not "
                f"apply); use the unscaled FP8, bf16 or fp16 file of this model")
        dtype, shape = info["dtype"], info["shape"]
        if dtype == "F8_E5M2":  # MLX 0.32's safetensors reader refuses the whole file
            raise WeightLoadError(f"{f}: '{name}' is F8_E5M2, which MLX cannot read; use an F8_E4M3, bf16 or fp16 file")
        if dtype == "F8_E8M0":
            raise WeightLoadError(f"{f}: '{name}' is F8_E8M0 (power-of-two scales), not weights")
        if 0 in shape:
            raise WeightLoadError(f"{f}: '{name}' is empty (shape {tuple(shape)}): a corrupt or truncated checkpoint")
        if dtype == "F8_E4M3":
            fp8.append(name)
    return fp8


def read_lazy(files: list[Path]) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Lazily map every tensor of the files; also return which file each key came from.

    Each header is checked first: `mx.load` accepts overlapping offsets and blocks forever on a FIFO.
    F8_E4M3 tensors are decoded to float16, which holds every E4M3 value exactly (so does any compute
    dtype it is cast to later); `mx.load` alone would hand them over as uint8 codes.
    """
    tensors: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            header = check_header(f)
        except HeaderError as e:
            raise WeightLoadError(str(e)) from e
        fp8 = _check_dtypes(f, header)
        try:
            shard = mx.load(str(f))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise WeightLoadError(f"{f}: unreadable or truncated safetensors file ({e})") from e
        for name in fp8:
            shard[name] = mx.from_fp8(shard[name], dtype=mx.float16)
        for k, v in shard.items():
            if k in tensors:
                raise WeightLoadError(f"{f}: key '{k}' also appears in {origin[k]}")
            tensors[k] = v
            origin[k] = f
    return tensors, origin


def check_floats(tensors: dict[str, mx.array], origin: dict[str, Path]) -> None:
    """Refuse integer/bool tensors in a torch-layout source: every weight there is a float, and an
    integer tensor would be used as raw numbers (our packed codes only ever come from save.py folders)."""
    for name, value in tensors.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise WeightLoadError(
                f"{origin[name]}: '{name}' is {_dtype_name(value.dtype)}, not a floating-point weight")


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def convert(
    tensors: dict[str, mx.array],
    origin: dict[str, Path],
    table: list[Rule],
    param_renames: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, mx.array]:
    """Source names -> our names with one format table; fused parts are concatenated (lazily).

    `names`, when given, is filled with our name -> the source key(s) and file, for error messages.
    """
    param_renames = param_renames or {}
    names = {} if names is None else names
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
            names[ours] = f"'{name}' in {origin[name]}"
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
        names[ours] = " + ".join(f"'{k}'" for k in sources[ours]) + f" in {origin[sources[ours][0]]}"
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
    names: dict[str, str] | None = None,
) -> None:
    """Set every parameter of `model` from `weights`, strictly, evaluating module by module.

    `prepare(module_name, weight, module)` may turn one incoming full-precision weight into the
    module's own parameters (quantizing while loading); by default a weight is cast to `dtype`.
    `weights` is consumed: each module's entries are removed as it loads, so an evaluated source
    tensor (a full-precision layer that was quantized or cast) is freed at once, not kept to the end.
    `names` (our key -> source key and file) only makes error messages name the source too.

    Every float parameter (and every full-precision weight before it is quantized) is checked for
    NaN/inf in the same `mx.eval` that loads the module: one reduction per tensor, no second pass
    over the file and no extra synchronisation. Quantized codes (integers) are not checked; their
    scales and biases are.
    """
    names = names or {}

    def where(key: str) -> str:
        return f"'{key}' (from {names[key]})" if key in names else f"'{key}'"

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
        checks: list[tuple[str, mx.array]] = []  # (our key, float tensor) to check with the module
        if prepare is not None and "weight" in params:
            incoming = params["weight"]
            if mx.issubdtype(incoming.dtype, mx.floating) and isinstance(module, (nn.QuantizedLinear,
                                                                                 nn.QuantizedEmbedding)):
                # Quantizing may hide a NaN or inf (into a group's scale or not): check the input itself.
                checks.append((f"{module_name}.weight", incoming))
            ready = prepare(module_name, incoming, module)
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
                    + (f" (from {names[key]})" if key in names else "")
                )
            if mx.issubdtype(want.dtype, mx.floating):
                if not mx.issubdtype(value.dtype, mx.floating):
                    raise WeightLoadError(f"{label}: {where(key)} is {_dtype_name(value.dtype)}, "
                                          f"not a floating-point weight")
                value = value.astype(want.dtype if _keeps_dtype(module, param) else dtype)
                checks.append((key, value))
            elif value.dtype != want.dtype:  # packed codes (uint32), microscaling scales (uint8)
                raise WeightLoadError(f"{label}: {where(key)} is {_dtype_name(value.dtype)}, expected "
                                      f"{_dtype_name(want.dtype)} (quantized layer)")
            new[param] = value
            loaded.add(key)
        module.update(new)
        probe = _finite_probe([t for _, t in checks]) if checks else None
        mx.eval(list(new.values()), *([probe] if probe is not None else []))
        if probe is not None and not all(probe.tolist()):
            for (key, tensor), ok in zip(checks, probe.tolist(), strict=True):
                if not ok and not mx.isfinite(tensor).all().item():  # exact, on the suspects only
                    too_big = ", or values too large for float16" if dtype == mx.float16 else ""
                    raise WeightLoadError(f"{label}: {where(key)} has non-finite values (NaN or inf{too_big}): "
                                          f"a corrupt or badly converted checkpoint")
        del checks, probe
    missing = sorted(set(expected) - loaded)
    if missing:
        raise WeightLoadError(f"{label}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _finite_probe(tensors: list[mx.array]) -> mx.array:
    """One flag per tensor, False where it may hold a NaN or inf: its plain sum is not finite.

    A NaN or inf anywhere makes the sum NaN or inf, so True is exact. False may also be a sum that
    overflowed (float16 tops out at 65504): the caller re-checks those exactly. A sum is one
    vectorised pass over memory the load just wrote, 5-9x cheaper on the CPU than `isfinite().all()`,
    which first writes a boolean array as large as the tensor.
    """
    return mx.isfinite(mx.stack([mx.sum(t).astype(mx.float32) for t in tensors]))


def _keeps_dtype(module: nn.Module, param: str) -> bool:
    # Quantization scales/biases keep the dtype they were made in.
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and param in ("scales", "biases")
