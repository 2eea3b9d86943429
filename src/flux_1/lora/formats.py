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
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..loading.tables import BFL_TRANSFORMER, DIFFUSERS_TRANSFORMER, Resolved, Rule, part_rows, resolve


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


def load_lora(path: str | Path, name: str | None = None) -> LoRA:
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX words its own errors; it also refuses float64 (some files' alphas)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata()
                tensors = {k: mx.array(f.get_tensor(k).astype("float32")) for k in f.keys()}
        except Exception:
            raise LoRAError(f"{path}: unreadable safetensors file ({e})") from e
    return LoRA(name or path.stem, tensors, metadata or {}, path)


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
    """What one source module adds to one slot. `kind` is lora | lokr | loha | diff | bias."""

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


@dataclass
class Patch:
    """Everything one LoRA adds to one of our linear modules."""

    component: str
    module: str
    shape: tuple[int, int]  # (out, in) of the module
    pieces: list[Piece]


@dataclass
class Report:
    name: str
    total: int  # keys in the file
    matched: int  # keys applied
    layers: dict[str, int]  # component -> modules touched
    skipped: dict[str, list[str]]  # reason -> keys

    def line(self) -> str:
        layers = " + ".join(f"{n} {c}" for c, n in self.layers.items()) + " layers"
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


def _inverse(rule: Rule) -> tuple[re.Pattern, str] | None:
    r"""(regex over our names, template of the source name) of a rule whose source is a plain dotted
    name with `(\d+)` groups; None for rules that cannot be inverted that way."""
    count = iter(range(1, 10))
    template = re.sub(r"\(\\d\+\)", lambda _: f"{{g{next(count)}}}", rule.source).replace(r"\.", ".")
    if re.search(r"[\\()\[\]|*+?]", template):
        return None
    target = re.sub(r"\\\\(\d)", r"(?P<g\1>\\d+)", re.escape(rule.target))
    return re.compile(target), template


_DIFFUSERS_INVERSE = [(rule, inv) for rule in DIFFUSERS_TRANSFORMER if (inv := _inverse(rule))]


def _transformer_names(module: str) -> list[tuple[str, Resolved]]:
    """Source spellings of one of our transformer modules: BFL names, then diffusers names (parts)."""
    names = []
    # BFL checkpoints spell nn.Sequential children without `.layers.`; keep what the BFL table maps back.
    for bfl in dict.fromkeys([re.sub(r"\.layers\.(\d+)", r".\1", module), module]):
        r = resolve(BFL_TRANSFORMER, bfl)
        if r is not None and r.target == module:
            names.append((bfl, r))
    for rule, (target, template) in _DIFFUSERS_INVERSE:
        if m := target.fullmatch(module):
            name = template.format(**m.groupdict())
            r = resolve(DIFFUSERS_TRANSFORMER, name)
            if r == Resolved(module, rule.part, rule.parts, rule.swap_halves):  # not shadowed by another rule
                names.append((name, r))
    return names


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


def _peft_config(metadata: dict[str, str], component: str) -> dict | None:
    """diffusers' `lora_adapter_metadata`: a LoraConfig dict, per component (`transformer.r`) or bare."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    prefix = {"transformer": "transformer.", "clip": "text_encoder."}[component]
    mine = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    if mine:
        return mine
    return config if "lora_alpha" in config else None


def _pattern(patterns: dict, module: str):
    """PEFT's rank/alpha_pattern lookup: an exact module name, else a regex matching a dotted suffix."""
    for key, value in (patterns or {}).items():
        if key == module or re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return None


def _lora_scale(rank: int, alpha: float | None, config: dict | None, module: str) -> float:
    if alpha is not None:
        return 1.0 if alpha == 0 else alpha / rank
    if config is None:
        return 1.0
    a = _pattern(config.get("alpha_pattern"), module)
    a = config.get("lora_alpha", rank) if a is None else a
    return a / math.sqrt(rank) if config.get("use_rslora") else a / rank


def _shape_error(lora: LoRA, key: str, got, want: str, slot: Slot, shape) -> LoRAError:
    where = f"{slot.component} module {slot.module} {tuple(shape)}"
    if slot.rows != shape[0]:
        where += f" rows {slot.row}:{slot.row + slot.rows}"
    hint = ""
    if slot.module == "img_in" and len(got) == 2 and got[-1] > shape[1]:
        hint = " (a Control/Fill LoRA widens img_in: not supported)"
    return LoRAError(f"LoRA '{lora.name}': '{key}' has shape {tuple(got)}, expected {want} for {where}{hint}")


def _product_shape(t: dict[str, mx.array], a: str, b: str, lora: LoRA, roles: dict, slot: Slot, shape):
    """(rows, cols) of t[a] @ t[b], checking the inner sizes agree."""
    if t[a].ndim != 2 or t[b].ndim != 2 or t[a].shape[1] != t[b].shape[0]:
        raise _shape_error(
            lora, roles[b], t[b].shape, f"({t[a].shape[-1]}, n) to follow {roles[a]}", slot, shape
        )
    return t[a].shape[0], t[b].shape[1]


def _pieces(
    lora: LoRA, roles: dict[str, str], slot: Slot, shape, config: dict | None, module: str
) -> list[Piece]:
    """The validated pieces of one source module. roles: role -> key."""
    t = {role: lora.tensors[key] for role, key in roles.items()}
    want = (slot.rows, shape[1])
    alpha = float(t["alpha"].reshape(-1)[0].item()) if "alpha" in t else None
    pieces = []

    def need(*names: str):
        missing = [n for n in names if n not in t]
        if missing:
            raise LoRAError(f"LoRA '{lora.name}': no {', '.join(missing)} next to {sorted(roles.values())}")

    def check(got: tuple, key: str, expected: tuple = want):
        if tuple(got) != expected:
            raise _shape_error(lora, key, got, str(expected), slot, shape)

    if "down" in t or "up" in t:
        need("down", "up")
        if t["down"].ndim != 2 or t["down"].shape[1] != want[1]:
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
        check(t["diff"].shape, roles["diff"])
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
SKIP_CONTROL_NORM = "norm weight replacements (BFL Control LoRA; not supported)"
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


def resolve_lora(lora: LoRA, specs: dict[str, Specs], strict: bool = True) -> tuple[list[Patch], Report]:
    """Resolve every key of a LoRA against our models' linear modules (specs by component:
    "transformer", and "clip" when a CLIP model is given). Validates every shape before anything
    is applied: a shape mismatch raises LoRAError; so do, when strict, an SD1.5/SDXL LoRA and a
    LoRA of which no key matched."""
    indexes = {c: build_index(c, s) for c, s in specs.items()}
    stems: dict[str, dict[str, str]] = {}  # stem -> role -> key
    skipped: dict[str, list[str]] = {}
    for key in lora.tensors:
        if m := _SUFFIX_RE.fullmatch(key):
            stems.setdefault(m.group(1), {})[SUFFIXES[m.group(2)]] = key
        else:
            control = key.endswith(("query_norm.scale", "key_norm.scale"))
            skipped.setdefault(SKIP_CONTROL_NORM if control else "not a LoRA tensor", []).append(key)

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
        pieces = _pieces(lora, roles, slot, shape, _peft_config(lora.metadata, component), name)
        if not pieces:  # an alpha alone
            skipped.setdefault("alpha without weights", []).extend(roles.values())
            continue
        by_module.setdefault(
            (component, slot.module), Patch(component, slot.module, shape, [])
        ).pieces += pieces
        matched += len(roles)

    layers = Counter(c for c, _ in by_module)
    report = Report(lora.name, len(lora.tensors), matched, {c: layers[c] for c in specs}, skipped)
    if strict and not layers["transformer"] and SKIP_FOREIGN in skipped:
        foreign = skipped[SKIP_FOREIGN]
        raise LoRAError(
            f"LoRA '{lora.name}' is not a FLUX.1 LoRA: {len(foreign)} keys name Stable Diffusion 1.5/SDXL "
            f"modules (e.g. {foreign[0]})"
        )
    if strict and matched == 0:
        first = ", ".join(list(lora.tensors)[:3])
        raise LoRAError(
            f"LoRA '{lora.name}': no key matches a FLUX.1 module ({report.line()}; first keys: {first})"
        )
    return list(by_module.values()), report
