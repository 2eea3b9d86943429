"""GGUF checkpoints: city96's FLUX.1 transformer GGUFs and llama.cpp-style T5 encoder GGUFs.

A GGUF holds one component. Files mix tensor types (Q4_K_S holds Q4_K, Q5_K and Q6_K, with F32/F16 for
small and 1-D tensors), so the quantization plan is per layer, read off the file: each quantized tensor
becomes one of our quantized layers directly (`gguf_quants.convert_tensor` repacks it into MLX affine
codes, or re-quantizes it, see docs/QUANTIZATION.md), and float tensors load as such.

Reading: `gguf.GGUFReader` memory-maps the file; tensors are converted one at a time and evaluated at
once, so the numpy temporaries of one tensor are all that exists besides the converted model: loading
peaks near the file size, never at the float size. The skeleton is quantized from the file's plan
before anything is assigned (`folder.build(..., plan=...)`), as for save.py folders.

Names (one table per component, below):
- transformer (`general.architecture = "flux"`): BFL names, as city96's `tools/convert.py` writes them
  (`double_blocks.0.img_attn.qkv.weight`, fused q|k|v and linear1, `.scale` norms); an optional
  `model.diffusion_model.` prefix is stripped (ComfyUI-GGUF's loader accepts it). sd.cpp files carry no
  architecture: their keys decide. Shapes are ggml order (innermost first): reversed here.
- T5 (`t5encoder`, or `t5` whose decoder tensors are skipped): llama.cpp names (`enc.blk.N.attn_q`,
  `token_embd`, `enc.output_norm`, ...) -> the transformers names we use.

Every refusal is a `WeightLoadError` naming the file (and the tensor): not a regular file, unreadable or
truncated, another architecture, a tensor type we cannot convert, a tensor no rule maps, or (in
`assign`) a count or shape that does not fit the model.
"""

from __future__ import annotations

import stat
import warnings
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import quantization as q
from ..components import COMPONENTS
from . import tables
from .tables import Rule, resolve, split_param
from .weights import WeightLoadError

SUFFIX = ".gguf"
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # stripped from transformer keys (ComfyUI-GGUF)

# general.architecture -> our component. "t5" (a full encoder-decoder export) is read for its encoder.
ARCHITECTURES = {"flux": "transformer", "t5encoder": "t5", "t5": "t5"}
WHAT = {"transformer": "a FLUX.1 transformer ('flux')", "t5": "a T5 encoder ('t5encoder')"}

# city96 FLUX GGUFs -> ours: BFL names (the fused layout), spelled as MLX does (same rules as BFL files).
GGUF_TRANSFORMER = tables.BFL_TRANSFORMER
GGUF_TRANSFORMER_RENAMES = tables.BFL_PARAM_RENAMES  # `.scale` -> `.weight`

_T = r"enc\.blk\.(\d+)"
_A = r"encoder.block.\1.layer.0"
_F = r"encoder.block.\1.layer.1"
# llama.cpp T5 encoder names (gguf-py MODEL_ARCH.T5ENCODER; ComfyUI-GGUF T5_SD_MAP) -> ours.
GGUF_T5 = [
    Rule(r"token_embd", "shared"),
    Rule(rf"{_T}\.attn_q", rf"{_A}.SelfAttention.q"),
    Rule(rf"{_T}\.attn_k", rf"{_A}.SelfAttention.k"),
    Rule(rf"{_T}\.attn_v", rf"{_A}.SelfAttention.v"),
    Rule(rf"{_T}\.attn_o", rf"{_A}.SelfAttention.o"),
    Rule(rf"{_T}\.attn_rel_b", rf"{_A}.SelfAttention.relative_attention_bias"),
    Rule(rf"{_T}\.attn_norm", rf"{_A}.layer_norm"),
    Rule(rf"{_T}\.ffn_gate", rf"{_F}.DenseReluDense.wi_0"),
    Rule(rf"{_T}\.ffn_up", rf"{_F}.DenseReluDense.wi_1"),
    Rule(rf"{_T}\.ffn_down", rf"{_F}.DenseReluDense.wo"),
    Rule(rf"{_T}\.ffn_norm", rf"{_F}.layer_norm"),
    Rule(r"enc\.output_norm", "encoder.final_layer_norm"),
]
T5_DECODER = ("dec.", "output.")  # a "t5" export's decoder and LM head: not part of the encoder

TABLES = {"transformer": (GGUF_TRANSFORMER, GGUF_TRANSFORMER_RENAMES), "t5": (GGUF_T5, {})}
COMPONENTS_WITH_GGUF = tuple(TABLES)


def is_gguf(path: Path | str) -> bool:
    return str(path).lower().endswith(SUFFIX)


def open_reader(path: Path | str):
    """`gguf.GGUFReader` on a regular file (a FIFO would block, a folder cannot be mapped); any failure
    to parse (bad magic, a truncated header or tensor data) is a WeightLoadError naming the file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise WeightLoadError(f"GGUF file {path} does not exist") from None
    except OSError as e:
        raise WeightLoadError(f"{path}: cannot read GGUF file ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise WeightLoadError(f"{path} is {kind}, not a GGUF file")
    try:
        return GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        why = str(e) or type(e).__name__
        if "GGMLQuantizationType" in why or "is not a valid" in why:
            raise WeightLoadError(f"{path}: a tensor has an unknown GGUF tensor type ({why})") from e
        raise WeightLoadError(f"{path}: unreadable or truncated GGUF file ({why})") from e


def architecture(reader, path: Path | str) -> str:
    """`general.architecture`; files without one (stable-diffusion.cpp's) are recognised by their keys."""
    field = reader.get_field("general.architecture")
    if field is not None:
        try:
            return str(field.contents())
        except Exception:  # an older gguf-py layout
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    names = [t.name for t in reader.tensors]
    if any("double_blocks." in n for n in names):
        return "flux"
    if any(n.startswith("enc.blk.") for n in names):
        return "t5encoder"
    return "unknown (no general.architecture)"


def check_architecture(reader, path: Path | str, component: str) -> str:
    arch = architecture(reader, path)
    if ARCHITECTURES.get(arch) != component:
        hint = {"transformer": " (an LLM or another image model?)", "t5": ""}.get(component, "")
        raise WeightLoadError(f"{path}: a GGUF for architecture {arch!r}, not {WHAT[component]}{hint}")
    return arch


def component_of(path: Path | str) -> str | None:
    """Which of our components a GGUF file holds (None: none of ours), from its header."""
    try:
        return ARCHITECTURES.get(architecture(open_reader(path), path))
    except WeightLoadError:
        return None


def _tensors(reader, path: Path, component: str, arch: str):
    """(GGUF tensor, our key, logical row-major shape) for each tensor of the component, in file order."""
    table, renames = TABLES[component]
    for t in reader.tensors:
        name = t.name
        if component == "transformer":
            name = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
        elif arch == "t5" and name.startswith(T5_DECODER):
            continue
        module, param = split_param(name)
        r = resolve(table, module)
        if r is None or not param:
            raise WeightLoadError(f"{path}: unexpected tensor '{t.name}' (no rule maps it onto the {component})")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        yield t, f"{r.target}.{renames.get(param, param)}", shape


def gguf_shapes(path: Path | str, component: str) -> dict[str, tuple[int, ...]]:
    """Our-named logical shapes of a GGUF component, from its header only (nothing is converted)."""
    path = Path(path)
    reader = open_reader(path)
    arch = check_architecture(reader, path, component)
    return {key: shape for _, key, shape in _tensors(reader, path, component, arch)}


def gguf_types(path: Path | str, component: str | None = None) -> dict[str, int]:
    """{GGUF tensor type name: count} of a file (the mix, as ComfyUI-GGUF logs it), header only."""
    path = Path(path)
    reader = open_reader(path)
    arch = architecture(reader, path)
    component = component or ARCHITECTURES.get(arch, "transformer")
    counts = Counter(t.tensor_type.name for t, _, _ in _tensors(reader, path, component, arch))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def read_gguf(path: Path | str, component: str, dtype: mx.Dtype, policy: str = "requantize"):
    """Convert a GGUF component: (Source in our names, per-layer plan, {type: count}).

    One tensor at a time: each is converted by `gguf_quants.convert_tensor` and evaluated before the
    next, so only the converted tensors (about the file's size) and one tensor's temporaries exist.
    """
    from .folder import Source
    from .gguf_quants import convert_tensor

    path = Path(path)
    reader = open_reader(path)
    arch = check_architecture(reader, path, component)
    weights: dict[str, mx.array] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    names: dict[str, str] = {}
    plan: dict[str, dict] = {}
    types: Counter = Counter()
    for t, key, shape in _tensors(reader, path, component, arch):
        if key in shapes:
            raise WeightLoadError(f"{path}: tensor '{t.name}' maps onto '{key}', which is already set")
        kind = t.tensor_type.name
        try:
            data = t.data
            converted = convert_tensor(data, t.tensor_type, shape, dtype, policy)
            mx.eval(list(converted.arrays.values()))
        except WeightLoadError:
            raise
        except (ValueError, NotImplementedError, TypeError) as e:
            raise WeightLoadError(f"{path}: tensor '{t.name}' ({kind}, shape {shape}): {e}") from e
        module, param = split_param(key)
        where = f"'{t.name}' ({kind}) in {path}"
        if converted.quant is not None:
            if param != "weight":
                raise WeightLoadError(f"{path}: tensor '{t.name}' is quantized ({kind}), but only weights can be")
            plan[module] = dict(converted.quant)
            for sub, value in converted.arrays.items():
                weights[f"{module}.{sub}"] = value
                names[f"{module}.{sub}"] = where
        else:
            weights[key] = converted.arrays["weight"]
        names[key] = where
        shapes[key] = shape
        types[kind] += 1
        del converted, data
    source = Source(weights, str(path), shapes, names)
    return source, plan, dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))


_warned: set[tuple] = set()


def load_gguf_component(path: Path | str, component: str, dtype: mx.Dtype, spec: q.QuantSpec | None = None,
                        policy: str = "requantize") -> nn.Module:
    """Build one component (transformer or t5) from a GGUF file.

    The GGUF's quantized tensors keep the GGUF's quantization (repacked, or re-quantized per `policy`).
    A runtime `spec` (`-q`) applies only to the float tensors the policy of quantization.py quantizes
    (so `-q 8` on an F16 GGUF quantizes it like any float source); a warning says so when the file also
    holds quantized tensors.
    """
    from .folder import build

    if component not in TABLES:
        raise WeightLoadError(f"{path}: GGUF is read for the transformer and T5 only, not the {component}")
    source, plan, _types = read_gguf(path, component, dtype, policy)
    if spec is not None:
        try:
            skeleton = COMPONENTS[component].build(source.shapes)
        except (KeyError, ValueError) as e:
            raise WeightLoadError(f"{path}: {e} (a truncated or foreign GGUF?)") from e
        extra = {k: v for k, v in q.layer_plan(skeleton, component, spec).items() if k not in plan}
        del skeleton
        if plan:
            key = (str(path), spec)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"{Path(path).name} is quantized (GGUF): its {len(plan)} quantized layers keep the "
                              f"GGUF's quantization; -q {spec.label} applies to its {len(extra)} float layers only",
                              stacklevel=3)
        plan = {**extra, **plan}
    try:
        return build(component, source, dtype, None, plan=plan)
    except ValueError as e:  # a plan naming a layer that is not a linear/embedding of this model
        raise WeightLoadError(f"{path}: {e}") from e


def find_gguf(root: Path, component: str) -> Path | None:
    """A GGUF holding `component` in a model folder: at its root, or in the component's folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(root.glob(f"*{SUFFIX}")) + sorted((root / COMPONENTS[component].folder).glob(f"*{SUFFIX}"))
    for f in candidates:
        if f.is_file() and component_of(f) == component:
            return f
    return None


def _has_regular_weights(root: Path, component: str) -> bool:
    from .folder import bfl_transformer_file

    if (root / COMPONENTS[component].folder).is_dir() and any(
            (root / COMPONENTS[component].folder).glob("*.safetensors")):
        return True
    return component == "transformer" and bfl_transformer_file(root) is not None


def resolve_files(root: Path | None, transformer_gguf: Path | str | None = None,
                  t5_gguf: Path | str | None = None) -> dict[str, Path]:
    """{component: GGUF file} for a model: the files given (each checked: a regular file holding that
    component), else a GGUF found in the folder for a component whose regular weights are absent
    (no `transformer/` folder and no BFL single file; no `text_encoder_2/*.safetensors`)."""
    files: dict[str, Path] = {}
    for component, given in (("transformer", transformer_gguf), ("t5", t5_gguf)):
        if given is None:
            continue
        path = Path(given)
        check_architecture(open_reader(path), path, component)
        files[component] = path
    if root is not None and Path(root).is_dir():
        from .saved import is_saved_folder

        if not is_saved_folder(root):
            for component in COMPONENTS_WITH_GGUF:
                if component not in files and not _has_regular_weights(Path(root), component):
                    found = find_gguf(Path(root), component)
                    if found is not None:
                        files[component] = found
    return files
