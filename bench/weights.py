"""Random weights at a configuration's shapes, written as a diffusers-layout folder.

The names and shapes come from our own models (built lazily: nothing is computed for the skeleton),
then go through the inverse of `flux_1.loading.tables.DIFFUSERS_TRANSFORMER` (fused q|k|v and
`linear1` split into diffusers' parts, the final adaLN halves swapped), so the loader under test does
its real work: name mapping, concatenation, dtype cast, conv layout transpose. Each folder also gets
a `config.json`, so diffusers and transformers load the very same files with `from_pretrained`.

Weights are stored as bfloat16 by default (as on the Hub), sharded at `SHARD_BYTES` with an index,
as the Hub does for the transformer and T5.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from flux_1.components import COMPONENTS, PRECISIONS
from flux_1.loading import tables

from . import configs

SHARD_BYTES = 2 * 2**30
MARKER = "bench-weights.json"


def our_shapes(cfg: configs.BenchConfig, component: str) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes, from a lazily built model (no weight is ever evaluated)."""
    model = COMPONENTS[component].model(getattr(cfg, component))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array) -> mx.array:
    """Scaled so activations stay O(1) through every block (no overflow, no denormals to skew timings)."""
    param = name.rpartition(".")[2]
    if param == "bias":
        return 0.01 * mx.random.normal(shape, key=key)
    if len(shape) == 1:  # norm weights
        return 1.0 + 0.05 * mx.random.normal(shape, key=key)
    if "embedding" in name or name.startswith("shared") or "relative_attention_bias" in name:
        return 0.5 * mx.random.normal(shape, key=key)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return mx.random.normal(shape, key=key) * (fan_in**-0.5)


# ---------------------------------------------------------------------------------------------
# Ours -> diffusers names (the inverse of the loader's table)


def to_diffusers_transformer(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our (BFL-named) transformer weights -> diffusers FluxTransformer2DModel names and row blocks."""
    by_module: dict[str, dict[str, mx.array]] = {}
    for name, value in weights.items():
        module, param = tables.split_param(name)
        by_module.setdefault(module, {})[param] = value
    out: dict[str, mx.array] = {}
    for module, params in by_module.items():
        hits = tables.source_names(tables.DIFFUSERS_TRANSFORMER, module)
        if not hits:
            raise KeyError(f"no diffusers name for our module {module!r}")
        first = hits[0][1]
        if len(hits) != first.parts:
            raise KeyError(f"{module}: found {len(hits)} of {first.parts} diffusers parts")
        if "weight" in params and params["weight"].ndim == 2:
            rows = tables.part_rows(module, *params["weight"].shape, first.parts)
        else:
            rows = [params["weight"].shape[0]]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        for param, value in params.items():
            if first.swap_halves:
                a, b = mx.split(value, 2, axis=0)
                value = mx.concatenate([b, a], axis=0)
            for (source, _), start, n in zip(hits, starts, rows, strict=True):
                out[f"{source}.{param}"] = value[start : start + n] if len(hits) > 1 else value
    return out


def to_disk_names(component: str, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    if component == "transformer":
        return to_diffusers_transformer(weights)
    if component == "clip":  # FLUX.1's CLIP file was saved by transformers 4: `text_model.` prefix
        return {f"text_model.{k}": v for k, v in weights.items()}
    if component == "vae":  # MLX conv layout (O, kH, kW, I) -> torch (O, I, kH, kW)
        return {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in weights.items()}
    return dict(weights)


def config_json(cfg: configs.BenchConfig, component: str) -> dict:
    return {
        "transformer": lambda: configs.diffusers_transformer_config(cfg.transformer),
        "vae": lambda: configs.diffusers_vae_config(cfg.vae),
        "t5": lambda: configs.t5_config(cfg.t5),
        "clip": lambda: configs.clip_config(cfg.clip),
    }[component]()


def write_component(cfg: configs.BenchConfig, component: str, root: Path, dtype: str = "bfloat16",
                    seed: int = 0) -> int:
    """Write one component folder; returns the bytes written. Memory: one shard at a time."""
    folder = root / COMPONENTS[component].folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(cfg, component), indent=2))
    shapes = our_shapes(cfg, component)
    stem = COMPONENTS[component].shard_stem
    base = mx.random.key(seed * 10 + list(COMPONENTS).index(component))
    keys = mx.random.split(base, len(shapes))

    # Group our tensors by module so that fused modules are split into parts in the same shard.
    modules: dict[str, list[str]] = {}
    for name in shapes:
        modules.setdefault(tables.split_param(name)[0], []).append(name)

    shards: list[dict[str, mx.array]] = []
    current: dict[str, mx.array] = {}
    size = 0
    total = 0
    index = {name: i for i, name in enumerate(shapes)}
    itemsize = PRECISIONS[dtype].size

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            _save(folder, stem, len(shards), current)
            current, size = {}, 0

    for names in modules.values():
        ours = {n: random_tensor(n, shapes[n], keys[index[n]]).astype(PRECISIONS[dtype]) for n in names}
        disk = to_disk_names(component, ours)
        mx.eval(list(disk.values()))
        nbytes = sum(v.size * itemsize for v in disk.values())
        if size and size + nbytes > SHARD_BYTES:
            flush()
        current.update(disk)
        size += nbytes
        total += nbytes
    flush()
    _finish_shards(folder, stem, shards, total)
    return total


def _save(folder: Path, stem: str, i: int, tensors: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(folder / f"{stem}-{i:05d}.tmp.safetensors"), tensors, metadata={"format": "pt"})
    names = list(tensors)
    tensors.clear()  # keep only the names (for the index), drop the arrays
    tensors.update(dict.fromkeys(names))


def _finish_shards(folder: Path, stem: str, shards: list[dict], total: int) -> None:
    """Rename the temp shards Hub-style (one file, or -0000i-of-0000n with an index.json)."""
    n = len(shards)
    tmp = [folder / f"{stem}-{i + 1:05d}.tmp.safetensors" for i in range(n)]
    if n == 1:
        tmp[0].rename(folder / f"{stem}.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(zip(tmp, shards, strict=True)):
        final = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(folder / final)
        weight_map.update({k: final for k in names})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_folder(cfg: configs.BenchConfig, root: Path, dtype: str = "bfloat16", seed: int = 0,
                 log=print) -> dict:
    """Write all four components under `root` (skipped when `root` already holds these models' weights)."""
    root = Path(root)
    marker = root / MARKER
    # The weights depend on the models' dims, not on the image size or token counts (--height/--width).
    described = cfg.describe()
    want = {"models": {k: described[k] for k in ("transformer", "t5", "clip", "vae")}, "dtype": dtype, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == want:
        info = json.loads(marker.read_text())
        log(f"reusing random weights in {root}")
        return {**info, "reused": True}
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    sizes = {}
    for component in COMPONENTS:
        folder = root / COMPONENTS[component].folder
        if folder.exists():
            for f in folder.iterdir():
                f.unlink()
        sizes[component] = write_component(cfg, component, root, dtype, seed)
        log(f"wrote {component}: {sizes[component] / 2**30:.2f} GiB {dtype}")
    info = {"spec": want, "bytes": sizes}
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}
