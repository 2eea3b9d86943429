"""Applying LoRAs to our models: a live side path by default, merged into the weights when asked.

Every linear a LoRA touches is replaced by a `LoRALinear`, which *is* the base layer (the same
arrays under the same parameter names, so `model.parameters()` and saving see the base weights)
plus the live adapters:

    y = base(x) + (x @ A.T) @ B.T + x @ D.T + b

A stacks the downs of every live low-rank piece (per-part scales folded in), B the matching ups
(strengths folded in, zeros outside each part's rows), so one matmul pair serves a whole fused
module and any number of LoRAs. A kohya/XLabs fused LoRA is one piece (A x computed once);
diffusers' to_q/to_k/to_v onto our fused qkv are three pieces side by side. D holds dense deltas
(LoKr, LoHa, `.diff`): a full (out, in) matrix per layer, as memory-heavy as the weight itself.

Why the side path by default: it is exact (no bf16 rounding of W + delta), works the same on
quantized layers (which cannot be merged without requantizing), and changing strengths or removing
a LoRA only rebuilds the small factors; removal restores the very base arrays (bit-exact). It costs
two rank-r matmuls per touched layer per call. `merge=True` folds the weight deltas of
full-precision layers into W instead (no per-call cost): W <- cast(f32(W) - D_old + D_new), with
D computed in float32 from the same factors each time, so undoing a merge subtracts exactly what
was added. What is not undone is the rounding of W to its dtype at each merge: with bf16 weights a
merge/unmerge round trip may move some elements by one bf16 ulp. Quantized layers and bias deltas
always stay on the side path.

A BFL Control LoRA (FLUX.1-Canny/Depth-dev-lora) widens `img_in` (64 -> 128 inputs) as diffusers'
`_maybe_expand_transformer_param_shape_or_error_` does: the layer's weight becomes [W | 0] (the old
weight in the first columns, zeros in the new ones, bias kept), each LoRA factor narrower than the
layer is zero-padded (diffusers `_maybe_expand_lora_state_dict`), and the transformer's
`params.in_channels` follows the width of `img_in` (diffusers sets `config.in_channels`). The width is
that of the widest live LoRA: removing the last wide one slices the weight back to its own columns
(bit-exact when nothing is merged; a merged layer is unmerged first, as always). Its norm weight
replacements are installed while the LoRA is live at a non-zero strength (the value as is, whatever
the strength, as diffusers' `_load_norm_into_transformer`; with several, the last added wins) and
the model's own norm weights are put back when it is removed or set to strength 0.

Apply LoRAs after the model is cast and quantized: the side factors are built in the layer's dtype
at that moment, and `nn.quantize` does not convert a wrapped layer.

Strengths must be finite numbers, and so must every tensor of a LoRA (formats.check_tensors). Finite
factors can still be absurd (a corrupt file, an extreme strength) and turn the image into NaN, so
every change of a layer is checked before it is installed: no weight may leave +-65504 (float16's
range; trained weights are orders of magnitude smaller), on the side path bounded without forming
B @ A (each entry of B @ A is at most the largest row norm of B times the largest column norm of
A). A change that fails leaves the layer as it was, and the stack undoes the rest of the operation
(add, set_strength / set_scales, set_merge), so a LoRAError never leaves a half-applied state.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .formats import SKIP_NO_CLIP, WIDENABLE, LoRA, LoRAError, Patch, Report, Specs, load_lora, resolve_lora

Live = dict[str, tuple[Patch, float]]  # LoRA name -> (its patch of this layer, strength)
MAX_WEIGHT = 65504.0  # float16's largest value: no weight may go past it
# Compiled: the elementwise test and the reduction fuse (no bool copy of a whole weight).
_all_finite = mx.compile(lambda x: mx.all(mx.isfinite(x)))
_all_within = mx.compile(lambda x: mx.all(mx.abs(x) <= MAX_WEIGHT))  # False for NaN too


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear))


def logical_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer; a quantized weight packs 32 // bits values per uint32 column."""
    out, cols = m["weight"].shape
    return (out, cols * 32 // m.bits) if "scales" in m else (out, cols)


def linear_specs(model: nn.Module) -> Specs:
    """(out, in) of every linear, LoRA-wrapped ones at their own width (before any widening)."""
    return {
        name: (logical_shape(m)[0], m._in) if isinstance(m, LoRALinear) else logical_shape(m)
        for name, m in model.named_modules()
        if is_linear(m)
    }


def norm_specs(model: nn.Module) -> dict[str, int]:
    """Size of every RMSNorm weight (what a Control LoRA's norm replacements resolve against)."""
    return {name: m["weight"].shape[0] for name, m in model.named_modules() if isinstance(m, nn.RMSNorm)}


@dataclass
class SidePath:
    a: mx.array | None = None  # (R, in)
    b: mx.array | None = None  # (out, R)
    dense: mx.array | None = None  # (out, in)
    bias: mx.array | None = None  # (out,)


def _cols(x: mx.array, width: int) -> mx.array:
    """x with `width` columns: zero columns added on the right, or the first `width` kept."""
    if x.shape[1] < width:
        return mx.pad(x, [(0, 0), (0, width - x.shape[1])])
    return x[:, :width] if x.shape[1] > width else x


def _delta(live: Live, shape: tuple[int, int]) -> mx.array:
    """sum_i strength_i * dense delta of patch i, (out, in) float32 (narrower deltas zero-padded)."""
    d = mx.zeros(shape, dtype=mx.float32)
    for patch, strength in live.values():
        for p in patch.pieces:
            if p.kind != "bias":
                d = d.at[p.slot.row : p.slot.row + p.slot.rows].add(_cols(strength * p.dense(), shape[1]))
    return d


def _bias_delta(live: Live, out: int) -> mx.array | None:
    """sum_i strength_i * bias delta of patch i, (out,) float32; None if no patch has one."""
    d = None
    for patch, strength in live.values():
        for p in patch.pieces:
            if p.kind == "bias":
                b = mx.pad(strength * p.bias(), [(p.slot.row, out - p.slot.row - p.slot.rows)])
                d = b if d is None else d + b
    return d


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or nn.QuantizedLinear) plus live LoRA adapters."""

    def __init__(self, base: nn.Linear | nn.QuantizedLinear):
        super().__init__()
        for k, v in base.items():  # weight, bias, scales, biases: the same arrays, no copy
            self[k] = v
        if isinstance(base, nn.QuantizedLinear):
            self.group_size, self.bits, self.mode = base.group_size, base.bits, base.mode
        self._no_grad = set(base._no_grad)
        # Plain attributes (not parameters, not children): the base layer is restored on unwrap.
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_in", logical_shape(base)[1])  # its own width (img_in may widen)
        self._call = type(base).__call__
        self._side = SidePath()
        object.__setattr__(self, "_merged", {})  # Live merged into W (a dict would become a child)
        object.__setattr__(self, "_live", {})  # every Live adapter

    @property
    def quantized(self) -> bool:
        return "scales" in self

    def __call__(self, x: mx.array) -> mx.array:
        y = self._call(self, x)  # the base layer's own forward, on our (shared) arrays
        s = self._side
        if s.a is not None:
            y = y + (x @ s.a.T) @ s.b.T
        if s.dense is not None:
            y = y + x @ s.dense.T
        if s.bias is not None:
            y = y + s.bias
        return y

    def set_loras(self, live: Live, merge: bool = False, where: str = "layer") -> None:
        """Make this layer's delta sum_i strength_i * patch_i (merged into W or on the side path).
        Raises LoRAError, the layer unchanged, when a weight would go past +-MAX_WEIGHT or to NaN.
        The layer is as wide as its widest live patch (img_in under a Control LoRA), never narrower
        than its own width."""
        old = logical_shape(self)
        shape = (old[0], max([self._in] + [patch.cols for patch, _ in live.values()]))
        if shape[1] != self._in and self.quantized:  # img_in is never quantized: a broken policy
            raise LoRAError(f"cannot widen the quantized {where} to {shape[1]} inputs (quantize it last)")
        to_merge = live if merge and not self.quantized else {}
        w = None
        if not to_merge and not self._merged and shape != old:  # only a new width: exact
            w = _cols(self["weight"], shape[1])
        elif _key(to_merge) != _key(self._merged) or shape != old:
            w = self["weight"].astype(mx.float32)
            if self._merged:
                w = w - _delta(self._merged, old)
            w = _cols(w, shape[1])
            if to_merge:
                w = w + _delta(to_merge, shape)
            w = w.astype(self["weight"].dtype)

        downs, ups, dense, out = [], [], None, shape[0]
        for name, (patch, strength) in live.items():
            for p in patch.pieces:
                rows = (p.slot.row, out - p.slot.row - p.slot.rows)  # zero padding above and below
                if p.kind == "bias" or name in to_merge:
                    continue
                if p.kind == "lora":
                    down, up = p.factors()
                    downs.append(_cols(down, shape[1]))
                    ups.append(mx.pad(strength * up, [rows, (0, 0)]))
                else:
                    d = mx.pad(_cols(strength * p.dense(), shape[1]), [rows, (0, 0)])
                    dense = d if dense is None else dense + d
        # The side path runs in the layer's activation dtype (built in float32, cast once).
        dtype = self["scales"].dtype if self.quantized else self["weight"].dtype
        a = mx.concatenate(downs, axis=0) if downs else None
        b = mx.concatenate(ups, axis=1) if ups else None
        bias = _bias_delta(live, out)  # bias deltas always stay here (cheap, exact)
        side = [None if x is None else x.astype(dtype) for x in (a, b, dense, bias)]
        new = [x for x in (w, *side) if x is not None]
        ok = [_all_finite(x) for x in side if x is not None]  # a cast to float16 may overflow
        ok += [_all_within(x) for x in (w, side[2], side[3]) if x is not None]
        if a is not None:
            norm = lambda x, axis: mx.sqrt(mx.sum(x * x, axis=axis)).max()  # noqa: E731
            ok.append(norm(b, 1) * norm(a, 0) <= MAX_WEIGHT)
        mx.eval(new, ok)
        if not all(x.item() for x in ok):
            strengths = ", ".join(f"'{n}' at strength {s:g}" for n, (_, s) in live.items())
            raise LoRAError(
                f"LoRA {strengths}: the change to {where} takes weights past +-65504 or to NaN "
                "(a corrupt LoRA or an extreme strength)"
            )
        if w is not None:
            self["weight"] = self._base["weight"] = w
            object.__setattr__(self, "_merged", dict(to_merge))
        object.__setattr__(self, "_live", dict(live))
        self._side = SidePath(*side)

    def bake(self) -> nn.Module:
        """The plain base layer with the adapters folded in for good: weight deltas merged (float32,
        one rounding), bias deltas added to the bias."""
        if self.quantized:
            raise ValueError(
                "cannot bake LoRAs into a quantized layer: bake in full precision, then quantize"
            )
        self.set_loras(self._live, merge=True)
        delta = _bias_delta(self._live, logical_shape(self)[0])
        if delta is not None:
            if "bias" not in self:  # adding a parameter would change the model's own layout
                raise ValueError("a LoRA adds a bias to a layer that has none: cannot bake it")
            self["bias"] = (self["bias"].astype(mx.float32) + delta).astype(self["bias"].dtype)
            mx.eval(self["bias"])
            self._side = SidePath()
        return self.unwrap()

    def unwrap(self) -> nn.Module:
        """The base layer, with this layer's current arrays (unmerge first to get the base weights)."""
        base = self._base
        for k, v in self.items():
            if not k.startswith("_"):
                base[k] = v
        return base


def _key(live: Live) -> dict:
    return {name: (id(patch), strength) for name, (patch, strength) in live.items()}


def _child(parent, part: str):
    return parent[int(part)] if isinstance(parent, list) else parent[part]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at a dotted path of `root` (list items by index: `double_blocks.0.img_attn.qkv`)."""
    *parents, last = path.split(".")
    parent = root
    for part in parents:
        parent = _child(parent, part)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path of `root`."""
    m = root
    for part in path.split("."):
        m = _child(m, part)
    return m


@dataclass
class Entry:
    name: str
    lora: LoRA
    strength: float
    report: Report
    patches: list[Patch]  # transformer patches, and CLIP ones once a CLIP model was seen
    clip_resolved: bool


PENDING_CLIP = "CLIP keys, pending (applied when the CLIP model is loaded)"


class LoRAStack:
    """The LoRAs applied to a pipeline's models, by name, with live strengths.

    It holds no reference to the models (the pipeline may release and reload the text encoders):
    every call takes them, and what is merged lives in each wrapped layer. CLIP keys of a LoRA added
    while no CLIP model is loaded are resolved and applied by `apply_text_encoder(clip)`.

        stack = LoRAStack.load(paths, scales, transformer, clip)   # prints one line per LoRA
        stack.set_scales([0.5, 1.2], transformer, clip)
        stack.remove(transformer, clip)                            # all, or name=...
    """

    def __init__(self, merge: bool = False):
        self.entries: dict[str, Entry] = {}
        self.merge = merge

    @classmethod
    def load(cls, paths, scales=None, transformer=None, clip=None, merge=False, log=print) -> LoRAStack:
        """Read, resolve (every key validated before anything changes) and apply LoRA files in order."""
        scales = lora_strengths(paths, scales)
        stack = cls(merge)
        try:
            for path, scale in zip(paths, scales, strict=True):
                report = stack.add(load_lora(path), scale, transformer, clip)
                if log is not None:
                    log(f"{report.line()} x {scale:g}")
        except Exception:
            stack.remove(transformer, clip)  # all or nothing: undo the files already applied
            raise
        return stack

    def add(
        self, lora: LoRA, strength: float, transformer: nn.Module, clip: nn.Module | None = None
    ) -> Report:
        models = _models(transformer, clip)
        patches, report = resolve_lora(
            lora, {c: linear_specs(m) for c, m in models.items()}, norms=norm_specs(transformer)
        )
        name, n = lora.name, 1
        while name in self.entries:
            n += 1
            name = f"{lora.name}#{n}"
        report.name = name
        pending = report.skipped.pop(SKIP_NO_CLIP, None) if clip is None else None
        if pending:  # the pipeline releases CLIP between prompts: apply_text_encoder applies these
            report.skipped[PENDING_CLIP] = pending
        strength = _strength(strength, f"LoRA strength for '{name}'")
        self.entries[name] = Entry(name, lora, strength, report, patches, clip is not None)
        try:
            self._refresh(patches, models)
        except Exception:
            del self.entries[name]
            self._refresh(patches, models)
            raise
        return report

    def set_strength(self, name: str, strength: float, transformer: nn.Module, clip: nn.Module | None = None):
        entry = self._entry(name)
        self._retune([entry], [_strength(strength, f"LoRA strength for '{name}'")], _models(transformer, clip))

    def set_scales(self, scales: list[float], transformer: nn.Module, clip: nn.Module | None = None):
        """One strength per LoRA, in the order they were added."""
        if len(scales) != len(self.entries):
            raise ValueError(f"got {len(scales)} LoRA scale(s) for {len(self.entries)} LoRA(s)")
        entries = list(self.entries.values())
        what = [f"LoRA scale #{i + 1} (for '{e.name}')" for i, e in enumerate(entries)]
        strengths = [_strength(s, w) for s, w in zip(scales, what, strict=True)]
        self._retune(entries, strengths, _models(transformer, clip))

    def _retune(self, entries: list[Entry], strengths: list[float], models: dict[str, nn.Module]) -> None:
        """Set these strengths, or none of them: a LoRAError restores the old ones."""
        old = [e.strength for e in entries]
        patches = [p for e in entries for p in e.patches]
        for e, s in zip(entries, strengths, strict=True):
            e.strength = s
        try:
            self._refresh(patches, models)
        except LoRAError:
            for e, s in zip(entries, old, strict=True):
                e.strength = s
            self._refresh(patches, models)
            raise

    def remove(self, transformer: nn.Module, clip: nn.Module | None = None, name: str | None = None):
        """Remove one LoRA (by name) or all; the layers they alone touched become the base layers again."""
        for entry in [self._entry(name)] if name is not None else list(self.entries.values()):
            del self.entries[entry.name]
            self._refresh(entry.patches, _models(transformer, clip))

    def set_merge(self, merge: bool, transformer: nn.Module, clip: nn.Module | None = None):
        """Fold the LoRAs into full-precision weights (True) or move them back to the side path."""
        old, self.merge = self.merge, merge
        patches = [p for e in self.entries.values() for p in e.patches]
        try:
            self._refresh(patches, _models(transformer, clip))
        except LoRAError:
            self.merge = old
            self._refresh(patches, _models(transformer, clip))
            raise

    def apply_text_encoder(self, clip: nn.Module):
        """Apply the CLIP part of every LoRA to a freshly loaded CLIP model."""
        specs = {"clip": linear_specs(clip)}
        added = {}
        for entry in self.entries.values():
            if not entry.clip_resolved:
                added[entry.name] = resolve_lora(entry.lora, specs, strict=False)[0]
                entry.patches += added[entry.name]
                entry.clip_resolved = True
        patches = [p for e in self.entries.values() for p in e.patches if p.component == "clip"]
        try:
            self._refresh(patches, {"clip": clip})
        except LoRAError:  # back to unresolved: the next CLIP model gets another try
            for name, new in added.items():
                entry = self.entries[name]
                entry.patches = entry.patches[: len(entry.patches) - len(new)]
                entry.clip_resolved = False
            self._refresh(patches, {"clip": clip})
            raise

    def touches_text_encoder(self) -> bool:
        """Whether any LoRA changes CLIP, i.e. whether prompt encodings depend on the strengths."""
        return any(
            any(p.component == "clip" for p in e.patches) or PENDING_CLIP in e.report.skipped
            for e in self.entries.values()
        )

    def info(self) -> list[dict]:
        """name, path and scale of each LoRA (for image metadata)."""
        return [
            {"name": e.name, "path": str(e.lora.path) if e.lora.path else None, "scale": e.strength}
            for e in self.entries.values()
        ]

    def lines(self) -> list[str]:
        return [f"{e.report.line()} x {e.strength:g}" for e in self.entries.values()]

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise KeyError(f"no LoRA named '{name}' (loaded: {', '.join(self.entries) or 'none'})")
        return self.entries[name]

    def _refresh(self, patches: list[Patch], models: dict[str, nn.Module]) -> None:
        """Rebuild every layer these patches touch from the current entries and strengths."""
        live: dict[tuple[str, str], Live] = {
            (p.component, p.module): {} for p in patches if p.component in models
        }
        for entry in self.entries.values():
            for p in entry.patches:
                if (p.component, p.module) in live:
                    live[(p.component, p.module)][entry.name] = (p, entry.strength)
        norms = {(p.component, p.module) for p in patches if p.norm}
        for (component, module), entries in sorted(live.items()):
            root = models[component]
            layer = get_module(root, module)
            if (component, module) in norms:
                _set_norm(layer, entries)
                continue
            if not isinstance(layer, LoRALinear):
                if not entries:
                    continue
                layer = LoRALinear(layer)
                set_module(root, module, layer)
            layer.set_loras(entries, self.merge, where=f"{component} module {module}")
            if not entries:
                set_module(root, module, layer.unwrap())
        if ("transformer", WIDENABLE) in live:
            _sync_in_channels(models["transformer"])


def _set_norm(norm: nn.Module, live: Live) -> None:
    """Install the norm weight of the last LoRA at a non-zero strength that replaces it, or put the
    model's own weight back (kept on the module, outside its parameters, while replaced)."""
    value = None
    for patch, strength in live.values():
        if strength != 0:
            value = patch.pieces[0].t["value"]
    own = getattr(norm, "_lora_own_weight", None)
    if value is None:
        if own is not None:
            norm["weight"] = own
            object.__delattr__(norm, "_lora_own_weight")
        return
    if own is None:
        object.__setattr__(norm, "_lora_own_weight", own := norm["weight"])
    norm["weight"] = value.astype(own.dtype)
    mx.eval(norm["weight"])


def _sync_in_channels(transformer: nn.Module) -> None:
    """params.in_channels = the input width of img_in (diffusers updates config.in_channels)."""
    params = getattr(transformer, "params", None)
    if not dataclasses.is_dataclass(params) or not hasattr(params, "in_channels"):
        return
    width = logical_shape(get_module(transformer, WIDENABLE))[1]
    if params.in_channels != width:
        transformer.params = dataclasses.replace(params, in_channels=width)


def lora_strengths(paths: list, scales: list | None) -> list[float]:
    """One finite strength per LoRA path (1.0 each when `scales` is None): the one count-and-value
    check for every entry point (Flux1, save, the CLIs)."""
    paths = list(paths)
    if scales is None:
        return [1.0] * len(paths)
    scales = list(scales)
    if len(scales) != len(paths):
        raise LoRAError(f"got {len(scales)} LoRA scale(s) for {len(paths)} LoRA path(s): give one scale per LoRA")
    return [_strength(s, f"LoRA scale #{i + 1} (for {p})") for i, (s, p) in enumerate(zip(scales, paths, strict=True))]


def _strength(value, what: str) -> float:
    """A strength as a float; NaN or inf would turn every touched layer (and the image) into NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # as the pipeline's finite_number
        raise LoRAError(f"{what} is {value!r}: a strength must be a number")
    s = float(value)
    if not math.isfinite(s):
        raise LoRAError(f"{what} is {s}: a strength must be a finite number")
    return s


def bake(model: nn.Module) -> int:
    """Fold every LoRA of a full-precision model into its weights for good (e.g. before quantizing
    and saving): each LoRALinear becomes its plain base layer again. Returns the layers baked; any
    LoRAStack that applied them is then stale."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in wrapped:
        set_module(model, name, layer.bake())
    for _, m in model.named_modules():  # replaced norm weights stay: forget the model's own
        if getattr(m, "_lora_own_weight", None) is not None:
            object.__delattr__(m, "_lora_own_weight")
    return len(wrapped)


def _models(transformer: nn.Module, clip: nn.Module | None) -> dict[str, nn.Module]:
    return {"transformer": transformer, **({"clip": clip} if clip is not None else {})}


def apply_loras(
    transformer: nn.Module,
    loras: list[LoRA],
    strengths: list[float] | None = None,
    clip: nn.Module | None = None,
    merge: bool = False,
) -> LoRAStack:
    """Apply LoRAs already read (strengths default to 1.0); see LoRAStack."""
    stack = LoRAStack(merge)
    for lora, strength in zip(loras, strengths or [1.0] * len(loras), strict=True):
        stack.add(lora, strength, transformer, clip)
    return stack
