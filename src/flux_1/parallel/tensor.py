"""Tensor-parallel FLUX transformer: each rank holds 1/N of the heads and MLP columns.

As mlx-examples' `Flux.shard` (Megatron-style), per block:
- all-to-sharded (output rows split, input replicated): the fused `qkv` (q | k | v, each segment split
  so a rank holds whole heads), `mlp.layers.0`, and the single block's `linear1` (q | k | v | mlp);
- sharded-to-all (input columns split, partial outputs summed): `proj`, `mlp.layers.2`, `linear2`
  (attn | mlp), each followed by one `all_sum` over the group (4 per double block, 1 per single block);
  and the modulations' `lin` (a third of a double block's weights): their input, the conditioning
  vector, is one token, so its sum is tiny (chunks x D values) and memory is then about 1/N.

Everything else (embedders, norms, final layer, img_in whatever its width) is replicated.
The layers stay plain `nn.Linear` / `nn.QuantizedLinear` of the rank's size, so quantization and the
LoRA side path work unchanged; the sum is the block's `reduce` (models/transformer.ShardedSum). A
sharded-to-all bias is added once: rank 0 holds it, the other ranks a zero bias.

Each rank reads only its share: from a diffusers or BFL folder, a sharded weight's rows (or columns)
are read straight from the file when its module loads (`slice_readers`, a memory map, so only the pages
holding them are touched: for column splits, whole 4 KiB pages of each row). Saved folders (packed codes)
and unusual sources load lazily, are sliced and copied to their own buffer (`mx.contiguous`), so the
source tensor is freed with its module: one source tensor is read whole at a time. Either way, memory
per rank is the replicated part plus 1/N of the sharded part, plus one layer while loading.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import quantization as q
from ..loading.weights import WeightLoadError, assign, read_lazy, shapes_of
from ..lora.layers import get_module, set_module
from ..models.transformer import FluxParams, FluxTransformer
from . import ParallelError

ROWS, COLS = "all-to-sharded", "sharded-to-all"


@dataclass(frozen=True)
class Split:
    kind: str  # ROWS: output features split; COLS: input features split, outputs summed over ranks
    segments: tuple[int, ...]  # widths of the fused parts along the split axis, each split evenly


def shard_plan(params: FluxParams) -> dict[str, Split]:
    """{module name: Split} of every sharded linear of the transformer."""
    D, M = params.hidden_size, params.mlp_hidden
    plan: dict[str, Split] = {}
    for i in range(params.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            plan[f"{p}_mod.lin"] = Split(COLS, (D,))
            plan[f"{p}_attn.qkv"] = Split(ROWS, (D, D, D))
            plan[f"{p}_attn.proj"] = Split(COLS, (D,))
            plan[f"{p}_mlp.layers.0"] = Split(ROWS, (M,))
            plan[f"{p}_mlp.layers.2"] = Split(COLS, (M,))
    for i in range(params.depth_single):
        plan[f"single_blocks.{i}.modulation.lin"] = Split(COLS, (D,))
        plan[f"single_blocks.{i}.linear1"] = Split(ROWS, (D, D, D, M))
        plan[f"single_blocks.{i}.linear2"] = Split(COLS, (D, M))
    return plan


def check_split(params: FluxParams, size: int) -> None:
    """Heads and MLP columns must split evenly over the ranks."""
    if params.num_heads % size:
        raise ParallelError(f"the transformer's {params.num_heads} attention heads do not split over {size} ranks: "
                            f"use a number of ranks that divides {params.num_heads}")
    if params.mlp_hidden % size:
        raise ParallelError(f"the transformer's MLP width {params.mlp_hidden} does not split over {size} ranks")


def segment_ranges(segments: tuple[int, ...], rank: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of this rank's share of each segment, along the full (fused) axis."""
    ranges, offset = [], 0
    for width in segments:
        share = width // size
        ranges.append((offset + rank * share, offset + (rank + 1) * share))
        offset += width
    return ranges


def take(x: mx.array, ranges: list[tuple[int, int]], axis: int, unit: int = 1) -> mx.array:
    """The ranges of x along `axis` (in logical columns; `unit` logical columns per stored one, for
    packed codes and group scales), concatenated and copied to its own buffer (a slice alone is a
    view that would keep the whole source tensor alive)."""
    parts = []
    for start, stop in ranges:
        if start % unit or stop % unit:
            raise ParallelError(f"a rank's share [{start}, {stop}) does not fall on whole groups of {unit}")
        index = [slice(None)] * x.ndim
        index[axis] = slice(start // unit, stop // unit)
        parts.append(x[tuple(index)])
    return mx.contiguous(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis))


def shard_tensor(param: str, value: mx.array, split: Split, rank: int, size: int,
                 quant: dict | None = None) -> mx.array:
    """This rank's part of one parameter (weight, bias, or a quantized layer's scales / biases) of a
    sharded linear. `quant`: the layer's {bits, group_size} when `value` is stored quantized."""
    ranges = segment_ranges(split.segments, rank, size)
    if split.kind == ROWS:
        return take(value, ranges, 0)
    if param == "bias":  # a sharded-to-all bias: added once after the sum
        return value if rank == 0 else mx.zeros_like(value)
    unit = 1
    if quant is not None:
        unit = 32 // quant["bits"] if param == "weight" else quant["group_size"]
    return take(value, ranges, 1, unit)


def local_shape(shape: tuple[int, int], split: Split, size: int) -> tuple[int, int]:
    """(out, in) of a linear's share."""
    out, inp = shape
    return (out // size, inp) if split.kind == ROWS else (out, inp // size)


class Reducer:
    """The sum over ranks a sharded block calls after proj / mlp.2 / linear2; counts what it sums."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.calls = 0
        self.bytes = 0

    def __call__(self, x: mx.array) -> mx.array:
        self.calls += 1
        self.bytes += x.size * x.dtype.size
        return mx.distributed.all_sum(x, group=self.group)


def shard_skeleton(model: FluxTransformer, plan: dict[str, Split], rank: int, size: int, reduce) -> None:
    """Shrink each sharded linear of a (lazy, unloaded) model to a rank's share; give each block its
    share of the heads and the reduce to call, each modulation its share of the input features."""
    share = model.params.hidden_size // size
    for name, m in model.named_modules():
        if name.endswith(("_mod", ".modulation")):
            m.columns = slice(rank * share, (rank + 1) * share)
            m.all_reduce = reduce
    modules = dict(model.named_modules())
    for name, split in plan.items():
        layer = modules[name]
        out, inp = local_shape(tuple(layer.weight.shape), split, size)
        set_module(model, name, nn.Linear(inp, out, bias="bias" in layer))
    for block in model.double_blocks:
        block.img_attn.num_heads //= size
        block.txt_attn.num_heads //= size
        block.all_reduce = reduce
    for block in model.single_blocks:
        block.num_heads //= size
        block.all_reduce = reduce


def check_groups(quant_plan: dict[str, dict], plan: dict[str, Split], size: int) -> None:
    """A quantized sharded-to-all layer splits its input columns: each rank's share of each segment
    must be whole quantization groups, or the slices would not be the single-process layer's groups."""
    for name, split in plan.items():
        how = quant_plan.get(name)
        if how is None or split.kind != COLS:
            continue
        for width in split.segments:
            if (width // size) % how["group_size"]:
                raise ParallelError(
                    f"{name}: its quantization group size {how['group_size']} does not divide a rank's "
                    f"{width // size} input columns ({width} over {size} ranks): use fewer ranks, or a smaller "
                    "group size")


# Source dtypes read straight from the file (numpy has no bfloat16: its bits are read as uint16).
FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8}


@dataclass
class _Part:
    file: Path
    info: dict  # the tensor's header entry: dtype, shape, data_offsets
    start: int  # first byte of the file's data section


def _read(part: _Part, pieces: list[tuple[int, int]], axis: int) -> mx.array:
    """Rows (axis 0) or columns (axis 1) `pieces` of one stored tensor, read from the file: a memory map
    touches only the pages holding them."""
    kind = part.info["dtype"]
    begin = part.info["data_offsets"][0]
    data = np.memmap(part.file, dtype=FILE_DTYPES[kind], mode="r", offset=part.start + begin,
                     shape=tuple(part.info["shape"]))
    chunks = [data[a:b] if axis == 0 else data[:, a:b] for a, b in pieces]
    out = mx.array(np.ascontiguousarray(np.concatenate(chunks, axis=axis)))
    del data
    if kind == "BF16":
        return out.view(mx.bfloat16)
    return mx.from_fp8(out, dtype=mx.float16) if kind == "F8_E4M3" else out


def slice_readers(root: Path, plan: dict[str, Split], rank: int, size: int) -> dict:
    """{our weight key: () -> this rank's share of it, read from disk} for the sharded weights of a
    diffusers or BFL folder whose sources can be read directly (plain float or FP8 tensors, fused parts
    by rows). Anything else is left out: it loads lazily and is sliced after reading (`shard_tensor`)."""
    from ..loading import folder, tables
    from ..loading.weights import component_files
    from ..safetensors_check import check_header

    transformer = root / "transformer"
    if transformer.is_dir():
        files, table, renames, strip = component_files(transformer, "transformer"), tables.DIFFUSERS_TRANSFORMER, {}, ()
    else:
        single = folder.bfl_transformer_file(root)
        if single is None:
            return {}
        files, table, renames, strip = [single], tables.BFL_TRANSFORMER, tables.BFL_PARAM_RENAMES, folder.BFL_PREFIXES
    fused: dict[str, dict[int, _Part]] = {}
    counts: dict[str, int] = {}
    for f in files:
        header = check_header(f)
        with open(f, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            name = next((name[len(p):] for p in strip if name.startswith(p)), name)
            module, param = tables.split_param(name)
            r = tables.resolve(table, module)
            if r is None or r.target not in plan or renames.get(param, param) != "weight" or r.swap_halves:
                continue
            if info["dtype"] not in FILE_DTYPES or len(info["shape"]) != 2:
                return {}  # an unusual source: the lazy path handles (and checks) it
            fused.setdefault(r.target, {})[r.part] = _Part(f, info, start)
            counts[r.target] = r.parts
    readers = {}
    for module, parts in fused.items():
        if len(parts) != counts[module]:
            continue  # a missing part: the lazy path names it
        split = plan[module]
        ranges = segment_ranges(split.segments, rank, size)
        if split.kind == COLS:
            if len(parts) != 1:
                continue
            readers[f"{module}.weight"] = functools.partial(_read, parts[0], ranges, 1)
            continue
        # Rows: each range of the fused tensor, from the part(s) it falls in (diffusers stores q, k, v apart).
        bounds, offset = [], 0
        for i in range(len(parts)):
            rows = parts[i].info["shape"][0]
            bounds.append((offset, offset + rows))
            offset += rows
        pieces = []
        for a, b in ranges:
            for i, (p0, p1) in enumerate(bounds):
                lo, hi = max(a, p0), min(b, p1)
                if lo < hi:
                    pieces.append((i, lo - p0, hi - p0))
        readers[f"{module}.weight"] = functools.partial(_read_rows, parts, pieces)
    return readers


def _read_rows(parts: dict[int, _Part], pieces: list[tuple[int, int, int]]) -> mx.array:
    chunks = [_read(parts[i], [(a, b)], 0) for i, a, b in pieces]
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=0)


def build_shard(source, dtype: mx.Dtype, spec: q.QuantSpec | None, quant_plan: dict | None,
                rank: int, size: int, reduce, readers: dict | None = None) -> FluxTransformer:
    """`loading.folder.build` for one rank: the architecture is read off the full shapes, the
    quantization plan is the single-process one (so each rank's groups are slices of the same
    groups), the sharded linears shrink, and each tensor is sliced before it is assigned."""
    shapes = source.shapes or shapes_of(source.weights)
    try:
        params = FluxParams.from_shapes(shapes)
    except KeyError as e:
        raise WeightLoadError(f"{source.label}: missing key '{e.args[0]}', which the transformer architecture "
                              "is read from (truncated or foreign checkpoint?)") from e
    except ValueError as e:
        raise WeightLoadError(f"{source.label}: {e}") from e
    check_split(params, size)
    plan = shard_plan(params)
    model = FluxTransformer(params)
    model.set_dtype(dtype)
    if quant_plan is None:
        quant_plan = q.layer_plan(model, "transformer", spec) if spec is not None else {}
    check_groups(quant_plan, plan, size)
    shard_skeleton(model, plan, rank, size, reduce)
    model.set_dtype(dtype)
    q.quantize_skeleton(model, quant_plan)
    readers = readers or {}
    weights = {}
    stored_quantized = source.shapes is not None  # a saved folder's packed codes
    for key, value in source.weights.items():
        module, _, param = key.rpartition(".")
        split = plan.get(module)
        if key in readers:  # read from disk in `prepare`, when its module loads; never the whole tensor
            value = mx.zeros(local_shape(tuple(value.shape), split, size), dtype=dtype)
        elif split is not None:
            how = quant_plan.get(module) if stored_quantized and module in quant_plan else None
            value = shard_tensor(param, value, split, rank, size, how)
        weights[key] = value
    source.weights.clear()

    def prepare(name: str, weight: mx.array, module: nn.Module) -> dict:
        read = readers.get(f"{name}.weight")
        if read is not None:
            weight = read()
            if isinstance(module, nn.QuantizedLinear) and not mx.isfinite(weight).all().item():
                raise WeightLoadError(f"{source.label}: '{name}.weight' has non-finite values (NaN or inf): a "
                                      "corrupt or badly converted checkpoint")
        return q.quantize_on_load(name, weight, module, dtype)

    assign(model, weights, dtype, source.label, prepare, source.names)
    return model


def load_shard(root: Path, dtype: mx.Dtype, spec: q.QuantSpec | None, group: mx.distributed.Group,
               gguf_files: dict | None = None) -> tuple[FluxTransformer, Reducer]:
    """This rank's share of the transformer under `root` (diffusers, BFL or save.py folder)."""
    from ..loading import folder, saved

    if gguf_files and "transformer" in gguf_files:
        raise ParallelError("--parallel tensor does not load a GGUF transformer: use its safetensors folder, "
                            "or --parallel data")
    reduce = Reducer(group)
    root = Path(root)
    quant_plan = None
    if saved.is_saved_folder(root):
        files, meta = saved.component_metadata(root, "transformer")
        layers = json.loads(meta.get("layers", "{}"))
        manifest = saved.read_manifest(root).get("quantization")
        tensors, _ = read_lazy(files)
        shapes = {k: q.logical_shape(tuple(v.shape), layers[k.rpartition(".")[0]]["bits"])
                  if k.endswith(".weight") and k.rpartition(".")[0] in layers else tuple(v.shape)
                  for k, v in tensors.items()}
        source = folder.Source(tensors, str(root / "transformer"), shapes)
        if layers or manifest:  # the saved plan decides, as load_saved_component
            quant_plan, spec = layers, None
        readers = None  # packed codes and our names: read lazily, then sliced
    else:
        source = folder.find_source(root, "transformer")
        try:
            params = FluxParams.from_shapes(shapes_of(source.weights))
        except (KeyError, ValueError):  # build_shard says what is wrong
            readers = None
        else:
            readers = slice_readers(root, shard_plan(params), group.rank(), group.size())
    model = build_shard(source, dtype, spec, quant_plan, group.rank(), group.size(), reduce, readers)
    return model, reduce


def shard_loras(stack, transformer: FluxTransformer, params: FluxParams, dtype: mx.Dtype, rank: int,
                size: int, merge: bool) -> None:
    """Apply a LoRAStack to a sharded transformer. Replicated layers (img_in under a Control LoRA, the
    modulation, norms) get it as in one process. For sharded layers the side path is built on a lazy
    full-size skeleton (never evaluated: only the small factors are) and split with its layer: B's
    rows (and a dense delta's, a bias delta) for all-to-sharded, A's columns (and a dense delta's)
    for sharded-to-all, whose bias delta only rank 0 adds. Sharded layers always use the side path."""
    from ..lora.layers import LoRALinear, SidePath

    plan = shard_plan(params)
    patches = [p for e in stack.entries.values() for p in e.patches if p.component == "transformer"]
    replicated = [p for p in patches if p.module not in plan]
    sharded = [p for p in patches if p.module in plan]
    old = stack.merge
    try:
        stack.merge = merge
        stack._refresh(replicated, {"transformer": transformer})
        if not sharded:
            return
        stack.merge = False
        skeleton = FluxTransformer(params)
        skeleton.set_dtype(dtype)
        stack._refresh(sharded, {"transformer": skeleton})
    finally:
        stack.merge = old
    for name in sorted({p.module for p in sharded}):
        full = get_module(skeleton, name)
        if not isinstance(full, LoRALinear):
            continue
        split, side = plan[name], full._side
        ranges = segment_ranges(split.segments, rank, size)
        if split.kind == ROWS:
            sliced = SidePath(a=side.a, b=None if side.b is None else take(side.b, ranges, 0),
                              dense=None if side.dense is None else take(side.dense, ranges, 0),
                              bias=None if side.bias is None else take(side.bias, ranges, 0))
        else:
            sliced = SidePath(a=None if side.a is None else take(side.a, ranges, 1), b=side.b,
                              dense=None if side.dense is None else take(side.dense, ranges, 1),
                              bias=side.bias if rank == 0 or side.bias is None else mx.zeros_like(side.bias))
        layer = get_module(transformer, name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            set_module(transformer, name, layer)
        object.__setattr__(layer, "_live", dict(full._live))
        layer._side = sliced
        mx.eval([x for x in (sliced.a, sliced.b, sliced.dense, sliced.bias) if x is not None])


def all_reduce_bytes(params: FluxParams, image_tokens: int, text_tokens: int, batch: int = 1,
                     itemsize: int = 2) -> dict[str, int]:
    """Bytes each rank all-reduces per denoising step (one transformer call), from the shapes:
    per double block 4 sums (proj and mlp.2 of each stream: B*N*D and B*L*D) and 2 modulations
    (B*6D); per single block 1 sum of B*(L+N)*D and its modulation (B*3D)."""
    D, N, L = params.hidden_size, image_tokens, text_tokens
    activations = params.depth * 2 * batch * (N + L) * D + params.depth_single * batch * (N + L) * D
    modulation = params.depth * 2 * batch * 6 * D + params.depth_single * batch * 3 * D
    calls = params.depth * 6 + params.depth_single * 2
    return {"calls": calls, "activations": activations * itemsize, "modulation": modulation * itemsize,
            "total": (activations + modulation) * itemsize}
