"""Bad LoRA files and strengths: each is one clear LoRAError naming the file and key, never a NaN
image, a traceback or a quietly different result. One test (or parametrized group) per class."""

from __future__ import annotations

import json
import os
import re
import signal
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from flux_1.lora import LoRA, LoRAError, LoRALinear, LoRAStack, load_lora
from flux_1.lora.formats import FP8
from flux_1.safetensors_check import HeaderError, check_header

from .common import MLP, D, Rand, effective_weights, linear_names, serialize, tiny_transformer, write_raw

QKV = "lora_unet_double_blocks_0_img_attn_qkv"
PROJ = "lora_unet_double_blocks_0_img_attn_proj"
L2 = "lora_unet_single_blocks_0_linear2"
TO_Q = "transformer.transformer_blocks.0.attn.to_q"
MOD = "diffusion_model.double_blocks.0.img_mod.lin"


def every_format(dtype: str = "F32") -> dict:
    """kohya + alpha, diffusers PEFT, LoKr (+ alpha), LoHa and full deltas, all in one file."""
    r = Rand(0)
    return {
        f"{QKV}.lora_down.weight": (dtype, r(4, D)), f"{QKV}.lora_up.weight": (dtype, r(3 * D, 4)),
        f"{QKV}.alpha": ("F32", np.float32(2.0)),
        f"{TO_Q}.lora_A.weight": (dtype, r(2, D)), f"{TO_Q}.lora_B.weight": (dtype, r(D, 2)),
        f"{PROJ}.lokr_w1": (dtype, r(4, 4)), f"{PROJ}.lokr_w2_a": (dtype, r(8, 2)),
        f"{PROJ}.lokr_w2_b": (dtype, r(2, 8)), f"{PROJ}.alpha": ("F32", np.float32(1.0)),
        **{f"{L2}.hada_{w}": (dtype, r(*s)) for w, s in [("w1_a", (D, 2)), ("w1_b", (2, D + MLP)),
                                                         ("w2_a", (D, 2)), ("w2_b", (2, D + MLP))]},
        f"{MOD}.diff": (dtype, r(6 * D, D)), f"{MOD}.diff_b": (dtype, r(6 * D)),
    }  # fmt: skip


@pytest.fixture(scope="module")
def model():
    """One tiny transformer for the module: every refusal must leave it untouched (checked)."""
    m = tiny_transformer()
    yield m
    assert not any(isinstance(x, LoRALinear) for _, x in m.named_modules())


def refused(path, model, match: str | None = None, scales=None, **kw) -> str:
    """The one-line LoRAError LoRAStack.load raises; the model must be left as it was."""
    before = effective_weights(model, linear_names(model))
    with pytest.raises(LoRAError) as info:
        LoRAStack.load([path], scales, model, log=None, **kw)
    msg = str(info.value)
    assert "\n" not in msg and (match is None or match in msg), msg
    assert not any(isinstance(x, LoRALinear) for _, x in model.named_modules())
    after = effective_weights(model, linear_names(model))
    assert all(np.array_equal(before[n], after[n]) for n in before)
    return msg


def deltas(path, model, **kw) -> dict[str, np.ndarray]:
    """The change of every layer a LoRA file makes (removed again afterwards)."""
    names = linear_names(model)
    before = effective_weights(model, names)
    stack = LoRAStack.load([path], None, model, log=None, **kw)
    after = effective_weights(model, names)
    stack.remove(model)
    return {n: after[n] - before[n] for n in names if not np.array_equal(after[n], before[n])}


def same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    for n in a:
        np.testing.assert_allclose(a[n], b[n], atol=atol, err_msg=n)


# ---------------------------------------------------------------------------------------------
# 1. Non-finite numbers: in any tensor, in the metadata, in a strength


@pytest.mark.parametrize("key", list(every_format()))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_any_tensor_is_refused_by_name(tmp_path, model, key, value):
    entries = every_format()
    x = np.array(entries[key][1], np.float32)
    x.reshape(-1)[x.size // 2] = value
    entries[key] = (entries[key][0], x)
    path = write_raw(tmp_path, "nan", entries)
    msg = refused(path, model, f"'{key}' holds NaN or inf")
    assert str(path) in msg


@pytest.mark.parametrize(
    "dtype,code",
    [("F16", b"\x00\x7e"), ("BF16", b"\x80\x7f"), ("F8_E4M3", b"\x7f"), ("F8_E5M2", b"\x7c"), ("F64", None)],
)
def test_non_finite_codes_of_every_float_dtype(tmp_path, model, dtype, code):
    entries = every_format(dtype)
    key = f"{QKV}.lora_down.weight"
    if code is None:  # finite in F64, but inf once in float32: refused too
        entries[key] = ("F64", np.full((4, D), 1e300))
    else:
        shape = [4, D]
        entries[key] = (dtype, shape, code * (4 * D))
    refused(write_raw(tmp_path, "nan", entries), model, f"'{key}' holds NaN or inf ({dtype})")


PEFT_FILE = {f"{TO_Q}.lora_A.weight": ("F32", Rand(1)(2, D)), f"{TO_Q}.lora_B.weight": ("F32", Rand(2)(D, 2))}


@pytest.mark.parametrize(
    "config,match",
    [
        ('{"lora_alpha": NaN, "r": 2}', "lora_alpha is nan, not a finite number"),
        ('{"lora_alpha": Infinity}', "lora_alpha is inf, not a finite number"),
        ('{"lora_alpha": 1e999}', "lora_alpha is inf"),
        ('{"lora_alpha": "nan"}', "lora_alpha is 'nan', not a finite number"),
        ('{"transformer.lora_alpha": -Infinity}', "transformer.lora_alpha is -inf"),
        ('{"lora_alpha": 4, "r": NaN}', " r is nan"),
        ('{"lora_alpha": 4, "alpha_pattern": {"to_q": NaN}}', "alpha_pattern['to_q'] is nan"),
        ('{"lora_alpha": 4, "rank_pattern": {"to_q": Infinity}}', "rank_pattern['to_q'] is inf"),
    ],
)
def test_non_finite_metadata_is_refused(tmp_path, model, config, match):
    path = write_raw(tmp_path, "meta", PEFT_FILE, {"lora_adapter_metadata": config})
    assert "lora_adapter_metadata" in refused(path, model, match)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "1.0", None, True])
def test_non_finite_strength_is_refused_by_position(tmp_path, model, scale):
    good = write_raw(tmp_path, "good", PEFT_FILE)
    msg = refused(good, model, scales=[scale], match=f"LoRA scale #1 (for {good}) is")
    assert "a strength must be" in msg
    stack = LoRAStack.load([good, good], [0.5, 1.0], model, log=None)
    before = effective_weights(model, linear_names(model))
    for change in (lambda: stack.set_scales([1.0, scale], model), lambda: stack.set_strength("good#2", scale, model)):
        with pytest.raises(LoRAError, match="good#2"):
            change()
        assert [e.strength for e in stack.entries.values()] == [0.5, 1.0]
        after = effective_weights(model, linear_names(model))
        assert all(np.array_equal(before[n], after[n]) for n in before)
    stack.remove(model)


@pytest.mark.parametrize("merge", [False, True])
def test_finite_factors_that_overflow_are_refused_and_undone(tmp_path, model, merge):
    a, b = np.full((2, D), 1e10), np.full((D, 2), 1e30)  # each finite, b @ a is 2e40
    huge = {f"{TO_Q}.lora_A.weight": ("F32", a), f"{TO_Q}.lora_B.weight": ("F32", b)}
    where = "the change to transformer module double_blocks.0.img_attn.qkv takes weights past +-65504"
    refused(write_raw(tmp_path, "huge", huge), model, where, merge=merge)
    # a strength that overflows: the old strengths and weights come back
    stack = LoRAStack.load([write_raw(tmp_path, "good", PEFT_FILE)], [0.5], model, merge=merge, log=None)
    before = effective_weights(model, linear_names(model))
    with pytest.raises(LoRAError, match="LoRA 'good' at strength 1e\\+06: the change to .* past \\+-65504"):
        stack.set_scales([1e6], model)
    assert stack.entries["good"].strength == 0.5
    after = effective_weights(model, linear_names(model))
    assert all(np.array_equal(before[n], after[n]) for n in before)
    stack.remove(model)


def test_float16_overflow_is_refused(tmp_path):
    """Finite in float32, over float16's 65504 once the side factors are cast to the layer dtype."""
    model = tiny_transformer()
    model.set_dtype(mx.float16)
    big = dict(PEFT_FILE, **{f"{TO_Q}.lora_B.weight": ("F32", np.full((D, 2), 1e5, np.float32))})
    with pytest.raises(LoRAError, match="past \\+-65504"):
        LoRAStack.load([write_raw(tmp_path, "big", big)], None, model, log=None)
    assert not any(isinstance(x, LoRALinear) for _, x in model.named_modules())


# ---------------------------------------------------------------------------------------------
# 2. Dtypes: factors are floats; F64 and F8 are converted exactly; integer alphas only if plausible


@pytest.mark.parametrize("dtype", ["I32", "I64", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64"])
def test_integer_or_bool_factor_is_refused_by_name(tmp_path, model, dtype):
    entries = every_format()
    key = f"{PROJ}.lokr_w2_a"
    entries[key] = (dtype, (np.array(entries[key][1]) * 10).astype(np.float32))
    refused(write_raw(tmp_path, "int", entries), model, f"'{key}' is {dtype}: a LoRA tensor must be floating point")


def test_f8_e8m0_is_not_a_float(tmp_path, model):
    entries = every_format()
    entries[f"{QKV}.lora_down.weight"] = ("F8_E8M0", [4, D], bytes(4 * D))
    refused(write_raw(tmp_path, "e8m0", entries), model, "is F8_E8M0: a LoRA tensor must be floating point")


def test_fp8_tables_match_known_codes():
    e4m3, e5m2 = FP8["F8_E4M3"], FP8["F8_E5M2"]
    assert e4m3[[0x38, 0xB8, 0x7E, 0x01, 0x08, 0x00, 0x80]].tolist() == [1, -1, 448, 2.0**-9, 2.0**-6, 0, -0.0]
    assert np.isnan(e4m3[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(e4m3, [0x7F, 0xFF])).all()
    assert e5m2[[0x3C, 0x7B, 0x01, 0x04]].tolist() == [1, 57344, 2.0**-16, 2.0**-14]
    assert e5m2[0x7C] == np.inf and e5m2[0xFC] == -np.inf and np.isnan(e5m2[[0x7D, 0x7E, 0x7F, 0xFF]]).all()


def test_fp8_tables_match_torch():
    torch = pytest.importorskip("torch")
    for name, dtype in [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)]:
        want = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
        np.testing.assert_array_equal(FP8[name], want)


@pytest.mark.parametrize("dtype,alpha", [("F8_E4M3", "F32"), ("F8_E5M2", "F32"), ("BF16", "F64"), ("F64", "F64")])
def test_f8_f64_and_bf16_load_as_their_exact_float32_values(tmp_path, model, dtype, alpha):
    """mx.load reads F8_E4M3 as raw bytes and refuses F8_E5M2 and F64; both paths give the values the
    same LoRA written in float32 gives."""
    entries = every_format(dtype)
    for key in (f"{QKV}.alpha", f"{PROJ}.alpha"):
        entries[key] = (alpha, entries[key][1])
    path = write_raw(tmp_path, "low", entries)
    exact = {k: v for k, v in load_lora(path).tensors.items()}
    assert all(v.dtype in (mx.float32, mx.bfloat16) for v in exact.values())
    as_f32 = {k: ("F32", np.array(v.astype(mx.float32))) for k, v in exact.items()}
    same(deltas(path, model), deltas(write_raw(tmp_path, "f32", as_f32), model), atol=0)


@pytest.mark.parametrize("dtype", ["I64", "I32"])
def test_integer_alpha_is_read_as_a_number(tmp_path, model, dtype):
    """LyCORIS writes `torch.tensor(alpha)`, an I64 when alpha is an int."""
    entries = every_format()
    want = deltas(write_raw(tmp_path, "float", entries), model)
    entries[f"{QKV}.alpha"] = (dtype, np.array(2))
    same(deltas(write_raw(tmp_path, "int", entries), model), want)


@pytest.mark.parametrize(
    "dtype,value,match",
    [
        ("I32", np.float32(2.0).view(np.int32), "is the integer I32 alpha outside [0, 65536] (a float misread?)"),
        ("I64", np.float64(2.0).view(np.int64), "is the integer I64 alpha outside"),
        ("I64", -1, "is the integer I64 alpha outside"),
        ("BOOL", True, "is BOOL: an alpha must be floating point"),
        ("I16", 2, "is I16: an alpha must be floating point"),
        ("U8", 2, "is U8: an alpha must be floating point"),
    ],
)
def test_implausible_integer_alpha_is_refused(tmp_path, model, dtype, value, match):
    entries = every_format()
    entries[f"{QKV}.alpha"] = (dtype, np.array(value))
    refused(write_raw(tmp_path, "alpha", entries), model, f"'{QKV}.alpha' {match}")


def test_in_memory_lora_is_checked_too(model):
    t = {f"{QKV}.lora_down.weight": mx.array(Rand(4)(4, D)), f"{QKV}.lora_up.weight": mx.full((3 * D, 4), mx.nan)}
    with pytest.raises(LoRAError, match=f"LoRA 'mem': '{QKV}.lora_up.weight' holds NaN or inf"):
        LoRAStack().add(LoRA("mem", t), 1.0, model)
    t[f"{QKV}.lora_up.weight"] = mx.ones((3 * D, 4), mx.int32)
    with pytest.raises(LoRAError, match="is int32: a LoRA tensor must be floating point"):
        LoRAStack().add(LoRA("mem", t), 1.0, model)


# ---------------------------------------------------------------------------------------------
# 3. What used to be a traceback


@pytest.mark.parametrize(
    "change,match",
    [
        ({f"{QKV}.lora_down.weight": ("F32", np.zeros((0, D), np.float32)),
          f"{QKV}.lora_up.weight": ("F32", np.zeros((3 * D, 0), np.float32))}, "has shape (0, 32): an empty"),
        ({f"{MOD}.diff": ("F32", np.zeros((0, D), np.float32))}, f"'{MOD}.diff' has shape (0, 32): an empty"),
        ({f"{QKV}.alpha": ("F32", np.array([2.0, 3.0], np.float32))}, "alpha 'lora_unet_double_blocks_0_img_attn_qkv"
                                                                      ".alpha' has shape (2,), expected one number"),
        ({f"{QKV}.lora_up.weight": ("F32", Rand(5)(3 * D, 3))}, "has shape (96, 3), expected (96, 4)"),
        ({f"{PROJ}.lokr_w1": ("F32", Rand(5)(16))}, f"'{PROJ}.lokr_w1' has shape (16,), expected a 2-D factor"),
        ({f"{PROJ}.lokr_w1": ("F32", Rand(5)(4, 4, 1))}, "expected a 2-D factor"),
        ({f"{L2}.hada_w1_b": ("F32", Rand(5)(2 * (D + MLP)))}, f"'{L2}.hada_w1_b' has shape (192,)"),
    ],
)  # fmt: skip
def test_bad_shapes_are_one_line_errors(tmp_path, model, change, match):
    refused(write_raw(tmp_path, "shape", {**every_format(), **change}), model, match)


@pytest.mark.parametrize(
    "config,match",
    [
        ("[1, 2]", "lora_adapter_metadata is a JSON list, not an object"),
        ('"abc"', "lora_adapter_metadata is a JSON str, not an object"),
        ("16", "lora_adapter_metadata is a JSON int, not an object"),
        ("{bad", "lora_adapter_metadata is not valid JSON (Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, "lora_adapter_metadata is not valid JSON (maximum recursion depth"),
        ('{"lora_alpha": "abc"}', 'lora_alpha is "abc", not a number'),
        ('{"lora_alpha": true}', "lora_alpha is true, not a number"),
        ('{"lora_alpha": [16]}', "lora_alpha is [16], not a number"),
        ('{"lora_alpha": 4, "alpha_pattern": {"to_(q": 2}}', "alpha_pattern key 'to_(q' is not a valid regex"),
        ('{"lora_alpha": 4, "rank_pattern": {"*": 2}}', "rank_pattern key '*' is not a valid regex"),
        ('{"lora_alpha": 4, "alpha_pattern": [1]}', "alpha_pattern is a JSON list, not an object"),
        ('{"lora_alpha": 4, "alpha_pattern": {"to_q": "x"}}', "alpha_pattern['to_q'] is \"x\", not a number"),
        ('{"lora_alpha": 4, "use_rslora": "yes"}', 'use_rslora is "yes", not true or false'),
    ],
)
def test_bad_metadata_is_a_one_line_error(tmp_path, model, config, match):
    path = write_raw(tmp_path, "meta", PEFT_FILE, {"lora_adapter_metadata": config})
    assert str(path) in refused(path, model, match)


def test_numeric_string_alpha_is_a_number(tmp_path, model):
    def with_alpha(alpha):
        meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha, "transformer.r": 2})}
        return deltas(write_raw(tmp_path, "meta", PEFT_FILE, meta), model)

    want = with_alpha(8)
    same(with_alpha("8"), want, atol=0)
    same(with_alpha(" 8.0 "), want, atol=0)
    same(with_alpha(2), {n: d / 4 for n, d in want.items()})


# ---------------------------------------------------------------------------------------------
# 4. Paths and headers


def test_directory_fifo_missing_and_short_files(tmp_path, model):
    refused(tmp_path, model, "is a directory, not a safetensors file")
    refused(tmp_path / "nope.safetensors", model, "nope.safetensors: no such file")
    for size in (0, 5):
        (tmp_path / "short.safetensors").write_bytes(b"x" * size)
        refused(tmp_path / "short.safetensors", model, f"{size} bytes: too short")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    signal.alarm(20)  # opening a FIFO blocks until a writer comes: fail instead of hanging
    try:
        refused(fifo, model, "is a FIFO, not a safetensors file")
    finally:
        signal.alarm(0)


def _file(tmp_path, header, data=b"", n=None, raw=None):
    path = tmp_path / "h.safetensors"
    if raw is None:
        raw = serialize(header, data)
        if n is not None:
            raw = struct.pack("<Q", n) + raw[8:]
    path.write_bytes(raw)
    return path


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"a": F32x4, "b": {**F32x4, "data_offsets": [8, 24]}}, bytes(24), "tensor 'b': data_offsets [8, 24] overlap"),
        ({"a": {**F32x4, "data_offsets": [4, 20]}}, bytes(20), "data_offsets [4, 20] leave a gap after byte 0"),
        ({"a": {**F32x4, "data_offsets": [16, 0]}}, bytes(16), "tensor 'a': data_offsets [16, 0] do not span"),
        ({"a": F32x4}, bytes(8), "tensor 'a': data_offsets [0, 16] run past the end of the data (8 bytes)"),
        ({"a": F32x4}, bytes(20), "4 bytes after the last tensor"),
        ({"a": {**F32x4, "shape": [2]}}, bytes(16), "do not span the 8 bytes of F32 [2]"),
        ({"a": {**F32x4, "shape": [4.0]}}, bytes(16), "shape [4.0] is not a list of non-negative integers"),
        ({"a": {**F32x4, "shape": [-4]}}, bytes(16), "shape [-4]"),
        ({"a": {**F32x4, "shape": [True]}}, bytes(16), "shape [True]"),
        ({"a": {**F32x4, "dtype": "F4"}}, bytes(16), "tensor 'a': unsupported dtype 'F4'"),
        ({"a": {**F32x4, "data_offsets": [0]}}, bytes(16), "data_offsets [0] is not two integers"),
        ({"a": {"dtype": "F32", "shape": [4]}}, bytes(16), "data_offsets None"),
        ({"a": [1, 2]}, b"", "tensor 'a': entry is not an object"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__ must map names to strings"),
        ([F32x4], bytes(16), "header is a JSON list, not an object"),
    ],
)  # fmt: skip
def test_check_header_refuses_what_mx_load_would_misread(tmp_path, header, data, match):
    path = _file(tmp_path, header, data)
    with pytest.raises(HeaderError) as info:
        check_header(path)
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"{path}: ")
    assert match in str(info.value) and "\n" not in str(info.value)


def test_check_header_refuses_broken_json_and_lengths(tmp_path):
    good = serialize({"a": F32x4}, bytes(16))
    for raw, match in [
        (struct.pack("<Q", 10**12) + good[8:], "header length 1000000000000 exceeds the file"),
        (struct.pack("<Q", 20) + good[8:], "header is not valid JSON"),
        (good[:8] + b"\xff" + good[9:], "header is not valid JSON ('utf-8' codec"),
        (good.replace(b'{"a"', b'{"a": 1, "a"'), "header is not valid JSON (key 'a' appears twice)"),
        (good[:8] + b"[" * 100_000 + b"]" * 100_000 + bytes(16), "header is not valid JSON (maximum recursion"),
    ]:
        if raw[:8] == good[:8]:
            raw = struct.pack("<Q", len(raw) - 8 - 16) + raw[8:]
        with pytest.raises(HeaderError, match=re.escape(match)):
            check_header(_file(tmp_path, None, raw=raw))


def test_check_header_accepts_what_safetensors_writes(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {"w": np.ones((2, 3), np.float16), "scalar": np.array(2, np.float32),
               "empty": np.zeros((0, 4), np.float32), "i": np.arange(3, dtype=np.int64)}  # fmt: skip
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = check_header(path)
    assert header["__metadata__"] == {"format": "pt"} and header["w"]["shape"] == [2, 3]
    assert set(header) == {"__metadata__", *tensors}
    save_file({}, str(path))
    assert check_header(path) == {}
