"""Seeded fuzzing of LoRA files: mutations of the header and data of five valid files in different
formats and dtypes, each loaded with `LoRAStack.load` onto the tiny transformer.

Each mutation says what it may do to the meaning of the file:
- "same" (reordered header, re-laid-out data, padding, an exact upcast, another spelling of a suffix,
  an extra non-LoRA tensor or metadata key, "16" for 16): must load, with the unmutated result;
- "refused" (a non-float dtype on a LoRA tensor, NaN/inf, malformed offsets, truncation, broken JSON,
  bad metadata, a non-finite strength): must be a one-line LoRAError. Loading would be a silent change;
- "changed" (a float dtype swap, random bytes, a renamed key, ...): either a one-line LoRAError or a
  load whose every layer change is finite.
Anything else (another exception type, a hang) fails. Cases are small; the seed makes every case
reproducible from its number, printed with the mutation on failure.
"""

from __future__ import annotations

import copy
import json
import signal
import struct

import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.lora import LoRAError, LoRALinear, LoRAStack
from flux_1.safetensors_check import DTYPE_SIZES, FLOAT_DTYPES

from .common import MLP, D, Rand, build, decode, effective_weight, encode, get, linear_names, serialize
from .common import tiny_transformer as make_transformer

SEED = 20250917
CASES = 200  # per base file: 1000 cases, about 5 s
EXTRA = "training.step"  # a non-LoRA tensor (reported as skipped, never read)

QKV, L1, L2 = "double_blocks_0_img_attn_qkv", "single_blocks_0_linear1", "single_blocks_0_linear2"


def bases() -> dict[str, tuple[dict, dict | None]]:
    """name -> (entries for common.build, metadata): kohya, diffusers + metadata, LyCORIS, float8, mixed."""
    r = Rand(7)
    tq, tk = "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k"
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    config = {"transformer.lora_alpha": 16, "transformer.r": 2, "transformer.alpha_pattern": {"to_k": 4}}
    return {
        "kohya_f32": ({
            f"lora_unet_{QKV}.lora_down.weight": ("F32", r(4, D)),
            f"lora_unet_{QKV}.lora_up.weight": ("F32", r(3 * D, 4)), f"lora_unet_{QKV}.alpha": ("F32", np.float32(2)),
            f"lora_unet_{L1}.lora_down.weight": ("F32", r(3, D)),
            f"lora_unet_{L1}.lora_up.weight": ("F32", r(3 * D + MLP, 3)),
            f"lora_unet_{L1}.alpha": ("F32", np.float32(6)),
            "lora_unet_img_in.lora_down.weight": ("F32", r(2, 8)), "lora_unet_img_in.lora_up.weight": ("F32", r(D, 2)),
            EXTRA: ("I64", np.array([1000])),
        }, None),
        "diffusers_bf16": ({
            f"{tq}.lora_A.weight": ("BF16", r(2, D)), f"{tq}.lora_B.weight": ("BF16", r(D, 2) / 8),
            f"{tk}.lora_A.weight": ("BF16", r(2, D)), f"{tk}.lora_B.weight": ("BF16", r(D, 2) / 2),
            f"{mlp}.lora_A.weight": ("BF16", r(2, D)), f"{mlp}.lora_B.weight": ("BF16", r(MLP, 2) / 8),
        }, {"lora_adapter_metadata": json.dumps(config), "format": "pt"}),
        "lycoris_f16": ({
            "lycoris_transformer_blocks_0_attn_to_out_0.lokr_w1": ("F16", r(4, 4)),
            "lycoris_transformer_blocks_0_attn_to_out_0.lokr_w2_a": ("F16", r(8, 2)),
            "lycoris_transformer_blocks_0_attn_to_out_0.lokr_w2_b": ("F16", r(2, 8)),
            "lycoris_transformer_blocks_0_attn_to_out_0.alpha": ("F16", np.float16(1)),
            **{f"lora_unet_{L2}.hada_{w}": ("F16", r(*s)) for w, s in [
                ("w1_a", (D, 2)), ("w1_b", (2, D + MLP)), ("w2_a", (D, 2)), ("w2_b", (2, D + MLP))]},
            "diffusion_model.txt_in.diff": ("F16", r(D, 16) / 4), "diffusion_model.txt_in.diff_b": ("F16", r(D)),
        }, None),
        "kohya_e4m3": ({  # read by mx.load as raw bytes
            f"lora_unet_{QKV}.lora_down.weight": ("F8_E4M3", r(4, D)),
            f"lora_unet_{QKV}.lora_up.weight": ("F8_E4M3", r(3 * D, 4)),
            f"lora_unet_{QKV}.alpha": ("F32", np.float32(4)),
        }, None),
        "mixed_numpy": ({  # F64 and F8_E5M2: read with numpy
            "double_blocks.0.processor.qkv_lora1.down.weight": ("BF16", r(2, D)),
            "double_blocks.0.processor.qkv_lora1.up.weight": ("BF16", r(3 * D, 2)),
            f"lora_unet_{L2}.lora_down.weight": ("F32", r(2, D + MLP)),
            f"lora_unet_{L2}.lora_up.weight": ("F32", r(D, 2)), f"lora_unet_{L2}.alpha": ("F64", np.float64(1.5)),
            "lora_unet_final_layer_linear.diff": ("F8_E5M2", r(8, D)),
        }, None),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The file as the mutations see it: header (dict, in order) and data bytes


class File:
    def __init__(self, header: dict, data: bytes):
        self.header, self.data, self.pad = copy.deepcopy(header), bytes(data), 8

    def names(self, lora_only: bool = False) -> list[str]:
        return [k for k in self.header if k != "__metadata__" and not (lora_only and k == EXTRA)]

    def raw(self) -> bytes:
        return serialize(self.header, self.data, self.pad)

    def relayout(self, order: list[str], new: dict[str, bytes] | None = None) -> None:
        """Rewrite the data section with the tensors in this order (bytes from `new` where given)."""
        new, data = new or {}, b""
        for k in order:
            info = self.header[k]
            chunk = new.get(k, self.data[info["data_offsets"][0] : info["data_offsets"][1]])
            info["data_offsets"] = [len(data), len(data) + len(chunk)]
            data += chunk
        self.data = data

    def bytes_of(self, k: str) -> bytes:
        begin, end = self.header[k]["data_offsets"]
        return self.data[begin:end]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _by_offset(f: File) -> list[str]:
    return sorted(f.names(), key=lambda k: f.header[k]["data_offsets"])


SAME_SIZE = [["F32", "I32", "U32"], ["F16", "BF16", "I16", "U16"],
             ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"], ["F64", "I64", "U64", "C64"]]  # fmt: skip
NON_FINITE = {
    "F32": ["<f4", [np.nan, np.inf, -np.inf]], "F64": ["<f8", [np.nan, -np.inf, 1e300]],  # 1e300: inf in float32
    "F16": ["<u2", [0x7E00, 0x7C00, 0xFC00]], "BF16": ["<u2", [0x7FC0, 0x7F80, 0xFF80]],
    "F8_E4M3": ["u1", [0x7F, 0xFF]], "F8_E5M2": ["u1", [0x7C, 0xFC, 0x7E]],
}  # fmt: skip
HUGE = {"F32": 3e38, "F64": 1e38, "F16": 65504, "BF16": 3.3e38, "F8_E4M3": 448, "F8_E5M2": 57344}
SPELLINGS = [["lora_down.weight", "lora_A.weight", "lora.down.weight"],
             ["lora_up.weight", "lora_B.weight", "lora.up.weight"]]


# Each mutation: (rng, File, base name) -> (raw bytes, kind, description[, strength]).


def m_reorder_header(rng, f, base):
    keys = list(f.header)
    f.header = {k: f.header[k] for k in rng.permutation(keys)}
    return f.raw(), "same", "header entries reordered"


def m_relayout_data(rng, f, base):
    f.relayout(list(rng.permutation(f.names())))
    return f.raw(), "same", "tensors reordered in the data section"


def m_pad_header(rng, f, base):
    f.pad = int(_pick(rng, [1, 3, 64, 4096]))
    return f.raw(), "same", f"header padded to a multiple of {f.pad}"


def m_extra_metadata(rng, f, base):
    f.header.setdefault("__metadata__", {}).update({"format": "pt", "ss_network_dim": "4", "x": "é\n{}"})
    return f.raw(), "same", "unrelated metadata"


def m_extra_tensor(rng, f, base):
    dtype = _pick(rng, sorted(DTYPE_SIZES))
    shape = [int(rng.integers(0, 4)), 2]
    f.header[f"{EXTRA}2"] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
    f.relayout(_by_offset(f), {f"{EXTRA}2": rng.bytes(DTYPE_SIZES[dtype] * shape[0] * 2)})
    return f.raw(), "same", f"a non-LoRA {dtype} {shape} tensor added"


def m_upcast(rng, f, base):
    k = _pick(rng, [k for k in f.names(True) if f.header[k]["dtype"] != "F64"])
    info = f.header[k]
    wide = "F64" if info["dtype"] == "F32" else _pick(rng, ["F32", "F64"])
    x = decode(f.bytes_of(k), info["dtype"], info["shape"])
    old, info["dtype"] = info["dtype"], wide
    f.relayout(_by_offset(f), {k: encode(x, wide)})
    return f.raw(), "same", f"{k} {old} -> {wide} (exact)"


def m_suffix_spelling(rng, f, base):
    renames = [(k, k[: -len(s)] + o) for k in f.names(True) for group in SPELLINGS for s in group if k.endswith("." + s)
               for o in group if o != s and k[: -len(s)] + o not in f.header]  # fmt: skip
    if not renames:
        return m_reorder_header(rng, f, base)
    old, new = _pick(rng, renames)
    f.header = {new if k == old else k: v for k, v in f.header.items()}
    return f.raw(), "same", f"{old} spelled {new}"


def m_dtype_same_size(rng, f, base):
    k = _pick(rng, f.names())
    old = f.header[k]["dtype"]
    new = _pick(rng, [d for g in SAME_SIZE if old in g for d in g if d != old])
    f.header[k]["dtype"] = new
    kind = "same" if k == EXTRA else "changed" if new in FLOAT_DTYPES else "refused"
    return f.raw(), kind, f"{k} {old} relabelled {new}"


def m_dtype_any(rng, f, base):
    k = _pick(rng, f.names(True))
    old = f.header[k]["dtype"]
    new = _pick(rng, [*DTYPE_SIZES, "F4", "Q4_0", "f32", "", 4, None])
    f.header[k]["dtype"] = new
    same_size = new in DTYPE_SIZES and DTYPE_SIZES[new] == DTYPE_SIZES[old]
    kind = "changed" if same_size and new in FLOAT_DTYPES else "refused"
    return f.raw(), kind, f"{k} {old} -> {new!r}"


def m_shape(rng, f, base):
    k = _pick(rng, f.names(True))
    info = f.header[k]
    old, s = info["shape"], list(info["shape"])
    op = int(rng.integers(8))
    if op == 0 and s:
        s[int(rng.integers(len(s)))] += int(rng.integers(1, 3))
    elif op == 1 and s:
        s[int(rng.integers(len(s)))] -= 1
    elif op == 2:
        s = s[::-1]
    elif op == 3:
        s = [1, *s]
    elif op == 4:
        s = s[1:]
    elif op == 5:
        s = [int(np.prod(s))] if rng.random() < 0.5 else []
    else:
        s = _pick(rng, [[-1, *s[1:]], [float(x) for x in s] or [1.0], "2,3", None, [[2]], [True] * max(len(s), 1)])
    info["shape"] = s
    ok = isinstance(s, list) and all(type(d) is int and d >= 0 for d in s)
    valid = ok and int(np.prod(s)) * DTYPE_SIZES[info["dtype"]] == len(f.bytes_of(k))
    return f.raw(), "changed" if valid else "refused", f"{k} shape {old} -> {s!r}"


def m_offsets_overlap(rng, f, base):
    k = _pick(rng, [k for k in f.names() if f.header[k]["data_offsets"][0] > 0])
    shift = int(rng.integers(1, f.header[k]["data_offsets"][0] + 1))
    f.header[k]["data_offsets"] = [o - shift for o in f.header[k]["data_offsets"]]
    return f.raw(), "refused", f"{k} offsets moved back {shift} bytes (overlap)"


def m_offsets_out_of_range(rng, f, base):
    k = _pick(rng, f.names())
    shift = int(_pick(rng, [1, 7, len(f.data), 2**40, 2**64]))
    f.header[k]["data_offsets"] = [o + shift for o in f.header[k]["data_offsets"]]
    return f.raw(), "refused", f"{k} offsets moved {shift} bytes on"


def m_offsets_reversed(rng, f, base):
    k = _pick(rng, f.names(True))
    f.header[k]["data_offsets"] = f.header[k]["data_offsets"][::-1]
    return f.raw(), "refused", f"{k} offsets reversed"


def m_offsets_swap(rng, f, base):
    pairs = [(a, b) for a in f.names() for b in f.names()
             if a < b and len(f.bytes_of(a)) == len(f.bytes_of(b))]  # fmt: skip
    if not pairs:
        return m_offsets_reversed(rng, f, base)
    a, b = _pick(rng, pairs)
    f.header[a]["data_offsets"], f.header[b]["data_offsets"] = f.header[b]["data_offsets"], f.header[a]["data_offsets"]
    return f.raw(), "same" if EXTRA in (a, b) and f.bytes_of(a) == f.bytes_of(b) else "changed", f"{a} <-> {b} data"


def m_offsets_garbage(rng, f, base):
    k = _pick(rng, f.names())
    end = f.header[k]["data_offsets"][1]
    bad = _pick(rng, [[0], [0, end, end], ["0", str(end)], [0.0, float(end)], None, {}, [-4, end], [True, end]])
    f.header[k]["data_offsets"] = bad
    return f.raw(), "refused", f"{k} data_offsets {bad!r}"


def m_truncate(rng, f, base):
    raw = f.raw()
    cut = int(rng.integers(0, len(raw)))
    return raw[:cut], "refused", f"truncated to {cut} of {len(raw)} bytes"


def m_append(rng, f, base):
    n = int(rng.integers(1, 65))
    return f.raw() + rng.bytes(n), "refused", f"{n} bytes appended"


def m_header_length(rng, f, base):
    raw = f.raw()
    (n,) = struct.unpack("<Q", raw[:8])
    new = int(_pick(rng, [n - 1, n + 1, n - int(rng.integers(1, n)), n + 8, 0, 2**63, 2**64 - 1]))
    return struct.pack("<Q", new) + raw[8:], "refused", f"header length {n} -> {new}"


def m_json_flip(rng, f, base):
    raw = bytearray(f.raw())
    i = int(rng.integers(8, 8 + struct.unpack("<Q", raw[:8])[0]))
    raw[i] = int(rng.integers(32, 127))
    return bytes(raw), "changed", f"header byte {i} -> {chr(raw[i])!r}"


def m_json_delete(rng, f, base):
    raw = f.raw()
    (n,) = struct.unpack("<Q", raw[:8])
    i = int(rng.integers(8, 8 + n))
    return struct.pack("<Q", n - 1) + raw[8:i] + raw[i + 1 :], "changed", f"header byte {i} ({chr(raw[i])!r}) deleted"


def m_json_not_utf8(rng, f, base):
    raw = f.raw()
    (n,) = struct.unpack("<Q", raw[:8])
    i = int(rng.integers(9, 8 + n - 1))
    bad = _pick(rng, [b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80"])
    return struct.pack("<Q", n + len(bad)) + raw[8:i] + bad + raw[i:], "refused", f"{bad!r} inserted in the header"


def m_json_not_object(rng, f, base):
    text = _pick(rng, [json.dumps(list(f.header.values())), "1", '"header"', "null", "[]", "", "{", "{}}"])
    h = text.encode()
    return struct.pack("<Q", len(h)) + h + f.data, "refused", f"header {text[:20]!r}"


def m_json_duplicate(rng, f, base):
    k = _pick(rng, f.names())
    other = _pick(rng, f.names())
    items = [json.dumps(n) + ": " + json.dumps(v) for n, v in f.header.items()]
    items.append(json.dumps(k) + ": " + json.dumps(f.header[other]))
    h = ("{" + ", ".join(items) + "}").encode()
    return struct.pack("<Q", len(h)) + h + f.data, "refused", f"{k} twice in the header"


def m_nan(rng, f, base):
    k = _pick(rng, f.names(True))
    info = f.header[k]
    np_dtype, codes = NON_FINITE[info["dtype"]]
    x = np.frombuffer(f.bytes_of(k), np_dtype).copy()
    i, code = int(rng.integers(x.size)), _pick(rng, codes)
    x[i] = code
    f.relayout(_by_offset(f), {k: x.tobytes()})
    return f.raw(), "refused", f"{k}[{i}] = {code!r} ({info['dtype']})"


def m_random_bytes(rng, f, base):
    data = bytearray(f.data)
    i, n = int(rng.integers(len(data))), int(rng.integers(1, 9))
    data[i : i + n] = rng.bytes(len(data[i : i + n]))
    f.data = bytes(data)
    return f.raw(), "changed", f"data bytes {i}:{i + n} randomized"


def m_huge(rng, f, base):
    k = _pick(rng, f.names(True))
    info = f.header[k]
    x = decode(f.bytes_of(k), info["dtype"], [-1]).copy()
    i = int(rng.integers(x.size))
    x[i] = HUGE[info["dtype"]] * _pick(rng, [1, -1])
    f.relayout(_by_offset(f), {k: encode(x, info["dtype"])})
    return f.raw(), "changed", f"{k}[{i}] = {x[i]:g}"


BAD_CONFIGS = [
    "[16]", '"x"', "7", "{bad", '{"lora_alpha": "abc"}', '{"lora_alpha": NaN}', '{"lora_alpha": Infinity}',
    '{"transformer.lora_alpha": -Infinity}', '{"lora_alpha": "nan"}', '{"lora_alpha": true}', '{"lora_alpha": [16]}',
    '{"lora_alpha": {}}', '{"lora_alpha": 1e999}', '{"lora_alpha": 4, "alpha_pattern": {"to_(k": 2}}',
    '{"lora_alpha": 4, "alpha_pattern": ["to_k"]}', '{"lora_alpha": 4, "alpha_pattern": {"to_k": NaN}}',
    '{"lora_alpha": 4, "alpha_pattern": {"to_k": "two"}}', '{"lora_alpha": 4, "rank_pattern": {"+": 2}}',
    '{"lora_alpha": 4, "rank_pattern": {"to_k": Infinity}}', '{"lora_alpha": 4, "use_rslora": "yes"}',
    '{"lora_alpha": 4, "r": NaN}',
]  # fmt: skip
SAME_CONFIGS = [  # of diffusers_bf16's {"transformer.lora_alpha": 16, "transformer.r": 2, alpha_pattern to_k: 4}
    '{"transformer.lora_alpha": "16", "transformer.r": 2, "transformer.alpha_pattern": {"to_k": "4"}}',
    '{"transformer.alpha_pattern": {"to_k": 4.0}, "transformer.r": "2", "transformer.lora_alpha": 16.0}',
    '{"transformer.lora_alpha": " 16 ", "transformer.r": 2, "transformer.alpha_pattern": {"to_k": 4},'
    ' "transformer.target_modules": ["to_q", "to_k"], "transformer.use_rslora": false, "text_encoder.r": 8}',
]  # fmt: skip


def m_metadata(rng, f, base):
    if base == "diffusers_bf16" and rng.random() < 0.3:
        config, kind = _pick(rng, SAME_CONFIGS), "same"
    else:
        config, kind = _pick(rng, BAD_CONFIGS), "refused"
    f.header.setdefault("__metadata__", {})["lora_adapter_metadata"] = config
    return f.raw(), kind, f"lora_adapter_metadata {config}"


def m_metadata_not_strings(rng, f, base):
    value = _pick(rng, [1, None, [1], {"a": "b"}, True])
    f.header["__metadata__"] = {**f.header.get("__metadata__", {}), "format": value}
    return f.raw(), "refused", f"__metadata__ value {value!r}"


def m_rename(rng, f, base):
    k = _pick(rng, f.names())
    i = int(rng.integers(len(k)))
    new = k[:i] + chr(int(rng.integers(33, 127))) + k[i + 1 :]
    items = [json.dumps(new if n == k else n) + ": " + json.dumps(v) for n, v in f.header.items()]
    h = ("{" + ", ".join(items) + "}").encode()  # kept as text: the new name may be a duplicate
    kind = "same" if new == k else "refused" if new in f.header else "changed"
    return struct.pack("<Q", len(h)) + h + f.data, kind, f"{k} renamed {new}"


def m_swap_names(rng, f, base):
    a, b = _pick(rng, f.names(True)), _pick(rng, f.names(True))
    f.header = {b if k == a else a if k == b else k: v for k, v in f.header.items()}
    return f.raw(), "same" if a == b else "changed", f"{a} <-> {b} names"


def m_drop_entry(rng, f, base):
    k = _pick(rng, f.names())
    del f.header[k]
    return f.raw(), "refused", f"{k} dropped from the header only"


def m_drop_tensor(rng, f, base):
    k = _pick(rng, f.names())
    del f.header[k]
    f.relayout(_by_offset(f))
    return f.raw(), "same" if k == EXTRA else "changed", f"{k} dropped"


def m_strength(rng, f, base):
    s = _pick(rng, [float("nan"), float("inf"), -float("inf"), 1e39, -1e39])
    return f.raw(), "refused", f"strength {s}", s


MUTATIONS = [v for k, v in dict(globals()).items() if k.startswith("m_")]


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = make_transformer()
    base = {n: effective_weight(get(m, n)) for n in linear_names(m)}
    yield m, base
    assert not any(isinstance(x, LoRALinear) for _, x in m.named_modules())


def _load(path, model, base, strength=1.0, merge=False) -> dict[str, np.ndarray] | str:
    """Every layer change of the file, or the LoRAError message."""
    try:
        stack = LoRAStack.load([path], [strength], model, merge=merge, log=None)
    except LoRAError as e:
        return str(e)
    try:
        return {n: effective_weight(m) - base[n] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    finally:
        stack.remove(model)
        if merge:  # W + delta - delta rounds (layers.py): a large delta would carry into later cases
            model.load_weights(_BASE_WEIGHTS[id(model)])


_BASE_WEIGHTS: dict[int, list] = {}


def _hang(signum, frame):
    raise TimeoutError("a case ran over 20 s")


@pytest.mark.parametrize("name", list(bases()))
def test_fuzz(tmp_path, model, name):
    model, base = model
    _BASE_WEIGHTS[id(model)] = tree_flatten(model.parameters())  # mlx arrays are immutable: no copy needed
    entries, metadata = bases()[name]
    header, data = build(entries, metadata)
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(serialize(header, data))
    want = {merge: _load(path, model, base, merge=merge) for merge in (False, True)}
    assert all(isinstance(w, dict) and w for w in want.values()), want

    seen = {"same": 0, "refused": 0, "changed": 0, "changed and loaded": 0}
    old = signal.signal(signal.SIGALRM, _hang)
    try:
        for i in range(CASES):
            rng = np.random.default_rng([SEED, list(bases()).index(name), i])
            mutate = MUTATIONS[(i + 7 * list(bases()).index(name)) % len(MUTATIONS)]
            raw, kind, what, *strength = mutate(rng, File(header, data), name)
            case = f"{name} case {i}: {mutate.__name__}: {what} ({kind})"
            path.write_bytes(raw)
            merge = bool(i % 2)
            signal.alarm(20)
            try:
                got = _load(path, model, base, strength[0] if strength else 1.0, merge)
            except Exception as e:  # noqa: BLE001 - the point: nothing but LoRAError may come out
                pytest.fail(f"{case}: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            seen[kind] += 1
            if isinstance(got, str):
                assert kind != "same", f"{case}: refused: {got}"
                assert got and "\n" not in got, f"{case}: message {got!r}"
                continue
            assert kind != "refused", f"{case}: loaded, a silent change"
            if kind == "same":
                assert got.keys() == want[merge].keys(), case
                for n in got:
                    np.testing.assert_allclose(got[n], want[merge][n], rtol=1e-6, atol=1e-7, err_msg=case)
            else:
                seen["changed and loaded"] += 1
                assert all(np.isfinite(d).all() for d in got.values()), f"{case}: non-finite change"
    finally:
        signal.signal(signal.SIGALRM, old)
    assert seen["same"] and seen["refused"] and seen["changed"], seen
