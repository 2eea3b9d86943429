"""LoRA files: classify every key, resolve it against our own module list, compute its scale.

A file is read as is (`load_lora`), then resolved per key against the (out, in) shapes of the linear
modules of our models (`resolve_lora`), never per file: files in the wild mix formats. A key is
`<stem>.<suffix>`; the suffix says what the tensor is (LoRA down/up, alpha, LoKr/LoHa factor, full
delta), the stem names the source module. Stems are looked up in an index built from our modules:
each of our names, spelled as BFL and as diffusers would spell it (both derived from the tables in
`flux_1.loading.tables`), with dots, and with underscores for kohya (`lora_unet_`), OneTrainer
(`lora_transformer_`) and LyCORIS (`lycoris_`) stems. Underscored names are only ever matched
against that index: turning `_` back into `.` is ambiguous (`img_attn`, `single_blocks`).

Our transformer is BFL-named (fused qkv / linear1, final adaLN in shift | scale order), so:
- kohya / BFL / XLabs fused LoRAs apply to our fused module as they are (one down, one up);
- diffusers per-part LoRAs (to_q, to_k, to_v, proj_mlp) land on row blocks of our fused module,
  the block sizes read off the module's shape (`tables.part_rows`);
- diffusers-named norm_out (shift and scale halves swapped w.r.t. ours) swaps the rows of up
  (or of the full delta), never of down.

Scale (delta W = strength * scale * up @ down), per the reference notes section 1.9:
- LoRA: alpha / rank with rank = down.shape[0] when the file has `<stem>.alpha` (alpha 0 => 1,
  kohya's own rule), else lora_alpha / r from the diffusers `lora_adapter_metadata` header,
  else 1. Kohya `split_qkv` files store the per-part alpha with the fused rank 3r; like every
  other loader we use alpha / 3r (kohya issue #2204).
- LoKr: alpha / dim only when a factor is low rank (dim = that factor's inner size), else 1.
- LoHa: alpha / w1_b.shape[0]. Full deltas `.diff` / `.diff_b`: 1.

BFL Control LoRAs (FLUX.1-Canny/Depth-dev-lora) need two things no other LoRA does (diffusers
`FluxLoraLoaderMixin.load_lora_weights`):
- their `img_in` down (and `.diff`) has more input columns than the layer (128 for 64: the control
  latents are concatenated to the noisy ones). `img_in` alone may differ in width, by a whole factor
  either way (a narrower factor on a widened layer is zero-padded, as `_maybe_expand_lora_state_dict`
  does); the layer is widened when applied (layers.py). Anywhere else a width mismatch is an error;
- full values for the QK-norm weights (`...query_norm.scale`, diffusers `...attn.norm_q.weight`):
  replacements, not deltas, resolved against the model's norm modules (`norms`) as `Patch(norm=True)`.

What is refused, so that a bad file is an error naming the file and key, never a black image or a
quietly different one (a file is corrupt as a whole: so are its unused keys):
- a header that does not describe the data exactly (`safetensors_check.check_header`, before any read);
- a LoRA tensor (any key with a suffix above) that is not floating point, is empty, or holds a NaN or
  inf. F16/BF16/F32 load as they are; F64 (some files' alphas) and F8 (E4M3 "fn", E5M2) are converted
  to float32 exactly, F8 through a 256-entry table (mx.load returns E4M3 as raw bytes and refuses
  E5M2). `.alpha` must be one number; an integer alpha is accepted only as I64/I32 in [0, 65536]
  (LyCORIS writes `torch.tensor(int)`; a float's bits read as an integer are far larger);
- a `lora_adapter_metadata` that is not a JSON object, or whose lora_alpha / r / alpha_pattern /
  rank_pattern values are not finite numbers (numeric strings such as "16" are read as numbers),
  whose patterns are not valid regexes, or whose use_rslora is not a boolean.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading.tables import BFL_TRANSFORMER, DIFFUSERS_TRANSFORMER, Resolved, Rule, part_rows, resolve, source_names
from ..safetensors_check import HeaderError, check_header


class LoRAError(ValueError):
    """A LoRA file that cannot be applied: names the file, the key and what was expected."""


Specs = dict[str, tuple[int, int]]  # our module name -> (out_features, in_features)

# What the last part of a key is. Longest suffixes are tried first (`diff_b` before `diff`).
# fmt: off
SUFFIXES = {
    "lora_A.weight": "down", "lora_A.default.weight": "down", "lora_down.weight": "down",
    "lora.down.weight": "down", "lora_linear_layer.down.weight": "down", "down.weight": "down",
    "lora_B.weight": "up", "lora_B.default.weight": "up", "lora_up.weight": "up",
    "lora.up.weight": "up", "lora_linear_layer.up.weight": "up", "up.weight": "up",
    "lora_B.bias": "up_bias", "lora_up.bias": "up_bias",
    "alpha": "alpha",
    **{f"lokr_{w}": f"lokr_{w}" for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    **{f"hada_{w}": f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    "diff": "diff", "diff_b": "diff_b",
    "dora_scale": "dora", "lora_magnitude_vector": "dora",
    "w_norm": "norm", "b_norm": "norm",
}
# fmt: on
_SUFFIX_RE = re.compile(
    r"(.+?)\.(" + "|".join(re.escape(s) for s in sorted(SUFFIXES, key=len, reverse=True)) + r")"
)

# Stem prefixes that choose the model (checked in order: `text_encoder_2.` before `text_encoder.`).
# fmt: off
COMPONENT_PREFIXES = [
    ("lora_te3_", "t5"), ("text_encoder_2.", "t5"), ("text_encoders.t5xxl.", "t5"),
    ("lora_te2_", "sdxl"),
    ("lora_te1_", "clip"), ("lora_te_", "clip"), ("text_encoders.clip_l.transformer.", "clip"),
    ("text_encoder.", "clip"),
]
# Stem prefixes of transformer LoRAs, stripped before the index lookup (dotted, then underscored).
TRANSFORMER_PREFIXES = [
    "model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
    "lora_unet_", "lora_transformer_", "lycoris_",
]
# fmt: on

# XLabs (x-flux) processor LoRAs -> BFL names. The single-block qkv LoRA covers q | k | v of linear1
# (its first 3 parts), not the MLP rows.
XLABS = [
    (Rule(r"double_blocks\.(\d+)\.processor\.qkv_lora1", r"double_blocks.\1.img_attn.qkv"), None),
    (Rule(r"double_blocks\.(\d+)\.processor\.proj_lora1", r"double_blocks.\1.img_attn.proj"), None),
    (Rule(r"double_blocks\.(\d+)\.processor\.qkv_lora2", r"double_blocks.\1.txt_attn.qkv"), None),
    (Rule(r"double_blocks\.(\d+)\.processor\.proj_lora2", r"double_blocks.\1.txt_attn.proj"), None),
    (Rule(r"single_blocks\.(\d+)\.processor\.qkv_lora", r"single_blocks.\1.linear1"), 3),
    (Rule(r"single_blocks\.(\d+)\.processor\.proj_lora", r"single_blocks.\1.linear2"), None),
]

# Module names of other architectures (SD1.5/SDXL UNet, SD3 MMDiT): such a LoRA is refused.
FOREIGN = re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|joint_blocks")


@dataclass
class LoRA:
    """A LoRA file as read: tensors by key (lazy) and its safetensors header metadata."""

    name: str
    tensors: dict[str, mx.array]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    checked: bool = field(default=False, repr=False)  # check_tensors passed (load_lora does it)

    def where(self) -> str:
        return f"LoRA file {self.path}" if self.path is not None else f"LoRA '{self.name}'"


def _fp8_table(exp_bits: int, man_bits: int, ieee: bool) -> np.ndarray:
    """The float32 value of each of the 256 codes of an 8-bit float (sign, exponent, mantissa)."""
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    e, m = (code >> man_bits) & ((1 << exp_bits) - 1), code & ((1 << man_bits) - 1)
    bias, top = (1 << (exp_bits - 1)) - 1, (1 << exp_bits) - 1
    frac = m / (1 << man_bits)
    v = sign * np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    if ieee:  # E5M2: the top exponent is inf (mantissa 0) or NaN, as in IEEE halves
        v = np.where(e == top, np.where(m == 0, sign * np.inf, np.nan), v)
    else:  # E4M3 "fn" (torch.float8_e4m3fn): no inf, only S.1111.111 is NaN
        v = np.where((e == top) & (m == (1 << man_bits) - 1), np.nan, v)
    return v.astype(np.float32)


FP8 = {"F8_E4M3": _fp8_table(4, 3, ieee=False), "F8_E5M2": _fp8_table(5, 2, ieee=True)}
# What mx.load reads itself (F8_E4M3 as raw uint8); a file with any other dtype is read with numpy.
MX_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "C64",
             "F8_E4M3", "F8_E8M0"}  # fmt: skip
NP_DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
    "U64": "<u8", "I64": "<i8", "F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8", "C64": "<c8",
    "F8_E4M3": "u1", "F8_E5M2": "u1", "F8_E8M0": "u1",
}  # fmt: skip


def _read_numpy(path: Path, header: dict) -> dict[str, mx.array]:
    """Every tensor of a file whose header check_header accepted, F64 and F8 decoded to float32."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            x = np.frombuffer(f.read(end - begin), NP_DTYPES[info["dtype"]]).reshape(info["shape"])
            if info["dtype"] == "F64":
                with np.errstate(over="ignore"):  # out of float32 range: inf, refused by check_tensors
                    x = x.astype(np.float32)
            elif info["dtype"] == "BF16":
                x = (x.astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] in FP8:
                x = FP8[info["dtype"]][x]
            out[key] = mx.array(x)
    return out


def load_lora(path: str | Path, name: str | None = None) -> LoRA:
    """Read a LoRA file: the header is checked first, then every LoRA tensor (check_tensors)."""
    path = Path(path)
    try:
        header = check_header(path)
    except HeaderError as e:
        raise LoRAError(f"LoRA file {e}") from None
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    try:
        if set(dtypes.values()) <= MX_DTYPES:  # lazy: nothing is read until check_tensors
            tensors = mx.load(str(path)) if dtypes else {}
            tensors = {k: mx.array(FP8[dtypes[k]])[v] if dtypes[k] in FP8 else v for k, v in tensors.items()}
        else:  # mx.load refuses F64 and F8_E5M2 outright
            tensors = _read_numpy(path, header)
    except (RuntimeError, ValueError, OSError) as e:  # the header was checked: only I/O is left
        raise LoRAError(f"LoRA file {path}: unreadable ({e})") from None
    lora = LoRA(name or path.stem, tensors, header.get("__metadata__", {}), path)
    check_tensors(lora, dtypes)
    return lora


# An integer alpha is a number a trainer wrote as `torch.tensor(int)` (I64; I32 from some numpy code).
# The bits of a float alpha read as an integer are far above this bound (2.0f is 1073741824).
INT_ALPHA = ("int64", "int32")
MAX_INT_ALPHA = 65536
# Compiled: isfinite and the reduction fuse, without a bool copy of the tensor (about 2x faster).
_all_finite = mx.compile(lambda x: mx.all(mx.isfinite(x)))


def check_tensors(lora: LoRA, file_dtypes: dict[str, str] | None = None) -> None:
    """Refuse, by key, a LoRA tensor that is not a finite float (alphas: also a plausible integer),
    is empty, or an alpha that is not one number. One batched evaluation for the whole file."""
    file_dtypes = file_dtypes or {}
    keys, oks = [], []
    for key, t in lora.tensors.items():
        m = _SUFFIX_RE.fullmatch(key)
        if m is None:  # not a LoRA tensor: reported as skipped (and, read by mx.load, never read)
            continue
        alpha = SUFFIXES[m.group(2)] == "alpha"
        mx_dtype = str(t.dtype).removeprefix("mlx.core.")
        dtype = file_dtypes.get(key, mx_dtype)
        if alpha and t.size != 1:
            raise LoRAError(f"{lora.where()}: alpha {key!r} has shape {tuple(t.shape)}, expected one number")
        if t.size == 0:
            raise LoRAError(f"{lora.where()}: {key!r} has shape {tuple(t.shape)}: an empty LoRA tensor")
        if alpha and mx_dtype in INT_ALPHA:
            keys.append((key, f"is the integer {dtype} alpha outside [0, {MAX_INT_ALPHA}] (a float misread?)"))
            oks.append(mx.all((t >= 0) & (t <= MAX_INT_ALPHA)))
            continue
        if not mx.issubdtype(t.dtype, mx.floating):
            what = "an alpha" if alpha else "a LoRA tensor"
            raise LoRAError(f"{lora.where()}: {key!r} is {dtype}: {what} must be floating point")
        keys.append((key, f"holds NaN or inf ({dtype})"))
        oks.append(_all_finite(t))
    if oks:
        try:
            good = mx.stack(oks).tolist()
        except RuntimeError as e:  # a lazy read that failed (file changed since the header check)
            raise LoRAError(f"{lora.where()}: unreadable ({e})") from None
        for (key, why), ok in zip(keys, good, strict=True):
            if not ok:
                raise LoRAError(f"{lora.where()}: {key!r} {why}")
    lora.checked = True


@dataclass(frozen=True)
class Slot:
    """Rows [row, row + rows) of one of our linear modules."""

    component: str
    module: str
    row: int
    rows: int
    swap: bool = False  # the source holds our two row halves in the other order


@dataclass
class Piece:
    """What one source module adds to one slot. `kind` is lora | lokr | loha | diff | bias | norm
    (norm: the full value `t["value"]` replacing a norm weight)."""

    kind: str
    slot: Slot
    scale: float
    t: dict[str, mx.array]  # the file's tensors, by role

    def factors(self) -> tuple[mx.array, mx.array]:
        """Low rank only: down (r, in) with the scale folded in, up (rows, r) in our row order; float32."""
        down = self.t["down"].astype(mx.float32) * self.scale
        return down, _swap(self.t["up"].astype(mx.float32), self.slot.swap)

    def dense(self) -> mx.array:
        """The full delta (rows, in), scaled, in our row order, float32."""
        f32 = {k: v.astype(mx.float32) for k, v in self.t.items()}
        if self.kind == "lora":
            down, up = self.factors()
            return up @ down
        if self.kind == "lokr":
            delta = mx.kron(_lokr_factor(f32, "w1"), _lokr_factor(f32, "w2"))
        elif self.kind == "loha":
            delta = (f32["hada_w1_a"] @ f32["hada_w1_b"]) * (f32["hada_w2_a"] @ f32["hada_w2_b"])
        else:
            delta = f32["diff"]
        return _swap(delta * self.scale, self.slot.swap)

    def bias(self) -> mx.array:
        return _swap(self.t["bias"].astype(mx.float32) * self.scale, self.slot.swap)

    @property
    def cols(self) -> int | None:
        """Input width of the weight delta (wider or narrower than the module only for img_in)."""
        if self.kind == "lora":
            return self.t["down"].shape[1]
        if self.kind == "diff":
            return self.t["diff"].shape[1]
        return None


@dataclass
class Patch:
    """Everything one LoRA adds to one of our linear modules, or (norm=True) the value it puts in
    place of one norm weight."""

    component: str
    module: str
    shape: tuple[int, int]  # (out, in) of the module; (dim,) for a norm
    pieces: list[Piece]
    norm: bool = False

    @property
    def cols(self) -> int:
        """Input width this patch needs: the module's, or wider for a Control LoRA's img_in."""
        return max([self.shape[-1]] + [c for p in self.pieces if (c := p.cols) is not None])


@dataclass
class Report:
    name: str
    total: int  # keys in the file
    matched: int  # keys applied
    layers: dict[str, int]  # component -> linear modules touched
    skipped: dict[str, list[str]]  # reason -> keys
    norms: int = 0  # norm weights replaced (BFL Control LoRAs)
    widened: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (in, in as applied)

    def line(self) -> str:
        layers = " + ".join(f"{n} {c}" for c, n in self.layers.items()) + " layers"
        layers += "".join(f" ({m} widened {a} -> {b})" for m, (a, b) in self.widened.items())
        if self.norms:
            layers += f", {self.norms} norm weights replaced"
        out = f"LoRA '{self.name}': {layers}, {self.matched}/{self.total} keys matched"
        if self.skipped:
            why = "; ".join(f"{len(keys)} {reason}, e.g. {keys[0]}" for reason, keys in self.skipped.items())
            out += f"; skipped {self.total - self.matched}: {why}"
        return out


# ---------------------------------------------------------------------------------------------
# The index: every spelling of each of our modules


def _swap(x: mx.array, swap: bool) -> mx.array:
    if not swap:
        return x
    a, b = mx.split(x, 2, axis=0)
    return mx.concatenate([b, a], axis=0)


def _lokr_factor(t: dict[str, mx.array], w: str) -> mx.array:
    return t[f"lokr_{w}"] if f"lokr_{w}" in t else t[f"lokr_{w}_a"] @ t[f"lokr_{w}_b"]


def _transformer_names(module: str) -> list[tuple[str, Resolved]]:
    """Source spellings of one of our transformer modules: BFL names, then diffusers names (parts)."""
    names = []
    # BFL checkpoints spell nn.Sequential children without `.layers.`; keep what the BFL table maps back.
    for bfl in dict.fromkeys([re.sub(r"\.layers\.(\d+)", r".\1", module), module]):
        r = resolve(BFL_TRANSFORMER, bfl)
        if r is not None and r.target == module:
            names.append((bfl, r))
    return names + source_names(DIFFUSERS_TRANSFORMER, module)


def build_index(component: str, specs: Specs) -> dict[str, Slot]:
    """Every accepted stem (prefix stripped) -> the slot it adds to, for one of our models."""
    index: dict[str, Slot] = {}

    def add(names: list[str], slot: Slot):
        for name in names:
            if index.setdefault(name, slot) != slot:
                raise AssertionError(f"LoRA index: '{name}' names both {index[name]} and {slot}")

    for module, (out, inp) in specs.items():
        if component == "clip":  # transformers names, with or without `text_model.`
            add(
                [module, f"text_model.{module}", "text_model_" + module.replace(".", "_")],
                Slot(component, module, 0, out),
            )
            continue
        for name, r in _transformer_names(module):
            rows = part_rows(module, out, inp, r.parts)
            slot = Slot(component, module, sum(rows[: r.part]), rows[r.part], r.swap_halves)
            add([name, name.replace(".", "_")], slot)
    return index


# ---------------------------------------------------------------------------------------------
# Resolution


def _route(stem: str) -> tuple[str, str]:
    """(component, stem without its prefix)."""
    for prefix, component in COMPONENT_PREFIXES:
        if stem.startswith(prefix):
            return component, stem[len(prefix) :]
    for prefix in TRANSFORMER_PREFIXES:
        if stem.startswith(prefix):
            return "transformer", stem[len(prefix) :]
    return "transformer", stem


def _xlabs_slot(name: str, index: dict[str, Slot], specs: Specs) -> Slot | None:
    for rule, first_parts in XLABS:
        bfl = rule.match(name)
        if bfl is None:
            continue
        slot = index.get(bfl)
        if slot is None or first_parts is None:
            return slot
        rows = part_rows(slot.module, *specs[slot.module], parts=4)
        return Slot(slot.component, slot.module, 0, sum(rows[:first_parts]))
    return None


@dataclass
class PeftConfig:
    """The parts of a diffusers LoraConfig that set scales, checked and parsed."""

    lora_alpha: float | None
    alpha_pattern: list[tuple[re.Pattern, float]]
    use_rslora: bool


def _number(value, what: str) -> float:
    """A finite number from a JSON value; a numeric string ("16") counts, a bool does not."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise LoRAError(f"{what} is {json.dumps(value)[:60]}, not a number") from None
    if not math.isfinite(x):
        raise LoRAError(f"{what} is {value!r}, not a finite number")
    return x


def _peft_config(lora: LoRA, component: str) -> PeftConfig | None:
    """diffusers' `lora_adapter_metadata`: a LoraConfig dict, per component (`transformer.r`) or bare."""
    raw = lora.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    what = f"{lora.where()}: lora_adapter_metadata"
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoRAError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{what} is a JSON {type(config).__name__}, not an object")
    prefix = {"transformer": "transformer.", "clip": "text_encoder."}[component]
    mine = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    if mine:
        config, what = mine, f"{what} {prefix}"
    elif "lora_alpha" not in config:
        return None
    else:
        what += " "
    alpha = config.get("lora_alpha")
    alpha = None if alpha is None else _number(alpha, f"{what}lora_alpha")
    if config.get("r") is not None:
        _number(config["r"], f"{what}r")
    patterns = {}
    for field_ in ("alpha_pattern", "rank_pattern"):
        value = config.get(field_) or {}
        if not isinstance(value, dict):
            raise LoRAError(f"{what}{field_} is a JSON {type(value).__name__}, not an object")
        patterns[field_] = []
        for key, v in value.items():
            try:  # PEFT's lookup: an exact module name, else a regex matching a dotted suffix
                pattern = re.compile(rf"(?:.*\.)?(?:{re.compile(key).pattern})")
            except re.error as e:
                raise LoRAError(f"{what}{field_} key {key!r} is not a valid regex ({e})") from None
            patterns[field_].append((pattern, _number(v, f"{what}{field_}[{key!r}]")))
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool) and rslora is not None:
        raise LoRAError(f"{what}use_rslora is {json.dumps(rslora)[:60]}, not true or false")
    return PeftConfig(alpha, patterns["alpha_pattern"], bool(rslora))


def _lora_scale(rank: int, alpha: float | None, config: PeftConfig | None, module: str) -> float:
    if alpha is not None:
        return 1.0 if alpha == 0 else alpha / rank
    if config is None:
        return 1.0
    a = next((v for p, v in config.alpha_pattern if p.fullmatch(module)), None)
    a = (rank if config.lora_alpha is None else config.lora_alpha) if a is None else a
    return a / math.sqrt(rank) if config.use_rslora else a / rank


# The one module whose input a LoRA may widen: img_in takes the packed latents, and Control (128) and
# Fill (384) models concatenate their conditioning to the 64 latent channels (diffusers
# `_MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX`: x_embedder -> in_channels).
WIDENABLE = "img_in"


def _widenable(slot: Slot, cols: int, inp: int) -> bool:
    """A factor of `cols` input columns fits img_in of `inp` (wider or narrower by a whole factor)."""
    return slot.module == WIDENABLE and slot.component == "transformer" and cols > 0 and (
        max(cols, inp) % min(cols, inp) == 0
    )


def _shape_error(lora: LoRA, key: str, got, want: str, slot: Slot, shape) -> LoRAError:
    where = f"{slot.component} module {slot.module} {tuple(shape)}"
    if slot.rows != shape[0]:
        where += f" rows {slot.row}:{slot.row + slot.rows}"
    hint = ""
    if len(got) == 2 and got[-1] > shape[1]:
        if slot.module == WIDENABLE:
            hint = f" (a Control/Fill LoRA may widen img_in, by a whole factor of {shape[1]})"
        else:
            hint = " (only img_in can be widened, by Control/Fill LoRAs)"
    return LoRAError(f"{lora.where()}: '{key}' has shape {tuple(got)}, expected {want} for {where}{hint}")


def _product_shape(t: dict[str, mx.array], a: str, b: str, lora: LoRA, roles: dict, slot: Slot, shape):
    """(rows, cols) of t[a] @ t[b], checking the inner sizes agree."""
    if t[a].ndim != 2 or t[b].ndim != 2 or t[a].shape[1] != t[b].shape[0]:
        raise _shape_error(
            lora, roles[b], t[b].shape, f"({t[a].shape[-1]}, n) to follow {roles[a]}", slot, shape
        )
    return t[a].shape[0], t[b].shape[1]


def _pieces(
    lora: LoRA, roles: dict[str, str], slot: Slot, shape, config: PeftConfig | None, module: str
) -> list[Piece]:
    """The validated pieces of one source module. roles: role -> key."""
    t = {role: lora.tensors[key] for role, key in roles.items()}
    want = (slot.rows, shape[1])
    alpha = float(t["alpha"].reshape(-1)[0].item()) if "alpha" in t else None
    pieces = []

    def need(*names: str):
        missing = [n for n in names if n not in t]
        if missing:
            raise LoRAError(f"{lora.where()}: no {', '.join(missing)} next to {sorted(roles.values())}")

    def check(got: tuple, key: str, expected: tuple = want):
        if tuple(got) != expected:
            raise _shape_error(lora, key, got, str(expected), slot, shape)

    if "down" in t or "up" in t:
        need("down", "up")
        if t["down"].ndim != 2 or (
            t["down"].shape[1] != want[1] and not _widenable(slot, t["down"].shape[1], want[1])
        ):
            raise _shape_error(lora, roles["down"], t["down"].shape, f"(rank, {want[1]})", slot, shape)
        if t["up"].ndim != 2 or t["up"].shape != (want[0], t["down"].shape[0]):
            raise _shape_error(
                lora, roles["up"], t["up"].shape, f"({want[0]}, {t['down'].shape[0]})", slot, shape
            )
        scale = _lora_scale(t["down"].shape[0], alpha, config, module)
        pieces.append(Piece("lora", slot, scale, {"down": t["down"], "up": t["up"]}))
        if "up_bias" in t:  # BFL LinearLora / PEFT lora_bias: scaled with the rest
            check(t["up_bias"].shape, roles["up_bias"], want[:1])
            pieces.append(Piece("bias", slot, scale, {"bias": t["up_bias"]}))
    if any(r.startswith("lokr_") for r in t):
        w = {r: v for r, v in t.items() if r.startswith("lokr_")}
        sizes, dim = [], None
        for f in ("w1", "w2"):
            if f"lokr_{f}" in t:
                if t[f"lokr_{f}"].ndim != 2:  # a conv (4-D) or stray factor
                    key = roles[f"lokr_{f}"]
                    raise _shape_error(lora, key, t[f"lokr_{f}"].shape, "a 2-D factor", slot, shape)
                sizes.append(tuple(t[f"lokr_{f}"].shape))
            else:
                need(f"lokr_{f}_a", f"lokr_{f}_b")
                sizes.append(_product_shape(t, f"lokr_{f}_a", f"lokr_{f}_b", lora, roles, slot, shape))
                dim = t[f"lokr_{f}_b"].shape[0]  # ComfyUI: w2's rank wins when both are factorized
        (a1, b1), (a2, b2) = sizes
        check((a1 * a2, b1 * b2), next(k for r, k in roles.items() if r.startswith("lokr_")))
        pieces.append(Piece("lokr", slot, 1.0 if alpha in (None, 0) or dim is None else alpha / dim, w))
    if any(r.startswith("hada_") for r in t):
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        for f in ("w1", "w2"):
            check(
                _product_shape(t, f"hada_{f}_a", f"hada_{f}_b", lora, roles, slot, shape),
                roles[f"hada_{f}_a"],
            )
        scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
        pieces.append(Piece("loha", slot, scale, {r: v for r, v in t.items() if r.startswith("hada_")}))
    if "diff" in t:
        d = t["diff"].shape
        check(d if len(d) != 2 or not _widenable(slot, d[1], want[1]) else (d[0], want[1]), roles["diff"])
        pieces.append(Piece("diff", slot, 1.0, {"diff": t["diff"]}))
    if "diff_b" in t:
        check(t["diff_b"].shape, roles["diff_b"], want[:1])
        pieces.append(Piece("bias", slot, 1.0, {"bias": t["diff_b"]}))
    return pieces


# Why keys are skipped (the report groups them by reason).
SKIP_T5 = "T5 text encoder keys (T5 LoRAs are not supported)"
SKIP_FOREIGN = "SD1.5/SDXL/SD3 module names"
SKIP_GUIDANCE = "dev-only guidance_in keys (this model has no guidance embedder: schnell)"
SKIP_NO_CLIP = "CLIP keys (no CLIP model given)"
SKIP_CONTROL_NORM = "norm weight replacements (BFL Control LoRA; no norm modules given)"
SKIP_NORM_NO_MODULE = "norm weight replacements naming no norm of this model"
# Control LoRA norm keys: BFL `<...>_norm.scale`, diffusers `<...>.norm_q.weight` (and k, added_q/k).
CONTROL_NORM = re.compile(r"(.*(?:query_norm|key_norm|\.norm_(?:added_)?[qk]))\.(scale|weight)")
SKIP_UNUSED = {
    "dora": "DoRA magnitudes (not supported; the low-rank part is applied)",
    "norm": "norm deltas (not supported)",
    "lokr_t2": "Tucker (conv) LoKr/LoHa factors (not supported)",
    "hada_t1": "Tucker (conv) LoKr/LoHa factors (not supported)",
    "hada_t2": "Tucker (conv) LoKr/LoHa factors (not supported)",
}


def _find(
    component: str, name: str, indexes: dict[str, dict[str, Slot]], specs: dict[str, Specs]
) -> Slot | str:
    """The slot a stem adds to, or why it is skipped."""
    if component == "t5":
        return SKIP_T5
    if component == "sdxl" or FOREIGN.search(name):
        return SKIP_FOREIGN
    if component not in indexes:
        return SKIP_NO_CLIP if component == "clip" else f"{component} keys (no {component} model given)"
    slot = indexes[component].get(name)
    if slot is None and component == "transformer":
        slot = _xlabs_slot(name, indexes[component], specs[component])
    if slot is not None:
        return slot
    if "guidance" in name and not any(m.startswith("guidance_in") for m in specs[component]):
        return SKIP_GUIDANCE
    return f"no such module in the {component}"


def build_norm_index(norms: dict[str, int]) -> dict[str, str]:
    """Every spelling of our transformer norm modules (BFL = ours, and diffusers) -> ours."""
    index = {}
    for module in norms:
        for name, _ in [(module, None), *source_names(DIFFUSERS_TRANSFORMER, module)]:
            index[name] = module
    return index


def _norm_patches(lora: LoRA, keys: dict[str, str], norms: dict[str, int]) -> list[Patch]:
    """Validated norm replacements (key -> our norm module): one finite float per element, the
    norm's shape. These keys are no LoRA tensors, so check_tensors left them unread."""
    patches, oks = [], []
    for key, module in keys.items():
        t = lora.tensors[key]
        if not mx.issubdtype(t.dtype, mx.floating):
            raise LoRAError(f"{lora.where()}: norm weight {key!r} is {t.dtype}: it must be floating point")
        if tuple(t.shape) != (norms[module],):
            raise LoRAError(
                f"{lora.where()}: norm weight {key!r} has shape {tuple(t.shape)}, expected "
                f"({norms[module]},) for transformer norm {module}"
            )
        slot = Slot("transformer", module, 0, norms[module])
        patches.append(Patch("transformer", module, (norms[module],), [Piece("norm", slot, 1.0, {"value": t})], True))
        oks.append(_all_finite(t) & mx.all(mx.abs(t) <= 65504.0))
    if oks:
        for key, ok in zip(keys, mx.stack(oks).tolist(), strict=True):
            if not ok:
                raise LoRAError(f"{lora.where()}: norm weight {key!r} holds NaN, inf or values past +-65504")
    return patches


def resolve_lora(
    lora: LoRA, specs: dict[str, Specs], strict: bool = True, norms: dict[str, int] | None = None
) -> tuple[list[Patch], Report]:
    """Resolve every key of a LoRA against our models' linear modules (specs by component:
    "transformer", and "clip" when a CLIP model is given) and, given `norms` (the transformer's
    norm modules -> size), its norm replacements. Validates every shape before anything is
    applied: a shape mismatch raises LoRAError; so do, when strict, an SD1.5/SDXL LoRA and a
    LoRA of which no LoRA key matched (norm replacements alone are no LoRA)."""
    if not lora.checked:  # a LoRA built in memory (load_lora checks what it reads)
        check_tensors(lora)
    configs = {c: _peft_config(lora, c) for c in specs}
    indexes = {c: build_index(c, s) for c, s in specs.items()}
    norm_index = build_norm_index(norms) if norms and "transformer" in specs else {}
    stems: dict[str, dict[str, str]] = {}  # stem -> role -> key
    skipped: dict[str, list[str]] = {}
    norm_keys: dict[str, str] = {}  # key -> our norm module
    for key in lora.tensors:
        if m := _SUFFIX_RE.fullmatch(key):
            stems.setdefault(m.group(1), {})[SUFFIXES[m.group(2)]] = key
        elif m := CONTROL_NORM.fullmatch(key):
            component, name = _route(m.group(1))
            module = norm_index.get(name) if component == "transformer" else None
            if module is not None and module not in norm_keys.values():
                norm_keys[key] = module
            else:
                why = SKIP_CONTROL_NORM if not norm_index else SKIP_NORM_NO_MODULE
                skipped.setdefault(why, []).append(key)
        else:
            skipped.setdefault("not a LoRA tensor", []).append(key)

    by_module: dict[tuple[str, str], Patch] = {}
    matched = 0
    for stem, roles in stems.items():
        component, name = _route(stem)
        slot = _find(component, name, indexes, specs)
        if isinstance(slot, str):
            skipped.setdefault(slot, []).extend(roles.values())
            continue
        for role in [r for r in roles if r in SKIP_UNUSED]:
            skipped.setdefault(SKIP_UNUSED[role], []).append(roles.pop(role))
        shape = specs[component][slot.module]
        pieces = _pieces(lora, roles, slot, shape, configs[component], name)
        if not pieces:  # an alpha alone
            skipped.setdefault("alpha without weights", []).extend(roles.values())
            continue
        by_module.setdefault(
            (component, slot.module), Patch(component, slot.module, shape, [])
        ).pieces += pieces
        matched += len(roles)

    layers = Counter(c for c, _ in by_module)
    lora_matched = matched
    norm_patches = _norm_patches(lora, norm_keys, norms or {})
    matched += len(norm_patches)
    widened = {
        p.module: (p.shape[1], p.cols) for p in by_module.values() if p.cols != p.shape[1]
    }
    report = Report(
        lora.name, len(lora.tensors), matched, {c: layers[c] for c in specs}, skipped, len(norm_patches), widened
    )
    if strict and not layers["transformer"] and SKIP_FOREIGN in skipped:
        foreign = skipped[SKIP_FOREIGN]
        raise LoRAError(
            f"{lora.where()} is not a FLUX.1 LoRA: {len(foreign)} keys name Stable Diffusion 1.5/SDXL "
            f"modules (e.g. {foreign[0]})"
        )
    if strict and lora_matched == 0:
        first = ", ".join(list(lora.tensors)[:3])
        raise LoRAError(
            f"{lora.where()}: no key matches a FLUX.1 module ({report.line()}; first keys: {first})"
        )
    return list(by_module.values()) + norm_patches, report
