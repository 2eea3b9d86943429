"""Bad weights never give a silent garbage image, a traceback or a hang: each class of fault found by
fuzzing and by hand is a clean WeightLoadError naming the file and the tensor (issue #9)."""

import json
import os
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1 import quantization as q
from flux_1.loading import folder
from flux_1.loading.weights import WeightLoadError


def read_st(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def poke(path, key, values: bytes, at: int = 0):
    """Overwrite bytes of one tensor's data in place (at a byte offset into that tensor)."""
    header, data = read_st(path)
    begin = header[key]["data_offsets"][0] + at
    write_st(path, header, data[:begin] + values + data[begin + len(values) :])


def copy_component(root, tmp_path, *subs):
    out = tmp_path / "model"
    out.mkdir()
    for sub in subs:
        src = root / sub
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / sub)
    return out


def params(model):
    return dict(tree_flatten(model.parameters()))


# -- 1. non-finite weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused_by_name(tiny_schnell, tmp_path, value):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    poke(
        root / "text_encoder" / "model.safetensors",
        "text_model.encoder.layers.1.mlp.fc1.weight",
        np.array([value], np.float32).tobytes(),
        at=40,
    )
    with pytest.raises(
        WeightLoadError,
        match=r"'encoder\.layers\.1\.mlp\.fc1\.weight' \(from "
        r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' in .*model\.safetensors\)"
        r" has non-finite values",
    ):
        folder.load_folder_component(root, "clip", mx.float32)


def test_non_finite_weight_is_refused_when_quantizing_while_loading(tiny_schnell, tmp_path):
    # The weight goes straight into mx.quantize: the check must see it before quantizing.
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    poke(
        root / "text_encoder" / "model.safetensors",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        np.array([np.nan], np.float32).tobytes(),
    )
    with pytest.raises(WeightLoadError, match=r"'encoder\.layers\.0\.self_attn\.q_proj\.weight'.*non-finite"):
        folder.load_folder_component(root, "clip", mx.float32, q.QuantSpec(bits=8, group_size=32))


def test_value_too_large_for_float16_is_refused(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    poke(
        root / "text_encoder" / "model.safetensors",
        "text_model.final_layer_norm.weight",
        np.array([1e6], np.float32).tobytes(),
    )
    folder.load_folder_component(root, "clip", mx.float32)  # fine in float32
    with pytest.raises(WeightLoadError, match=r"'final_layer_norm\.weight'.*too large for float16"):
        folder.load_folder_component(root, "clip", mx.float16)


def test_large_finite_float16_tensors_are_not_false_alarms(tiny_schnell, tmp_path):
    # The cheap check is a sum, which overflows float16 on large tensors: those are re-checked exactly.
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    path = root / "text_encoder" / "model.safetensors"
    header, _ = read_st(path)
    n = int(np.prod(header["text_model.embeddings.token_embedding.weight"]["shape"]))
    poke(path, "text_model.embeddings.token_embedding.weight", np.full(n, 60000.0, np.float32).tobytes())
    model = folder.load_folder_component(root, "clip", mx.float16)
    assert mx.all(model.embeddings.token_embedding.weight == 60000).item()


# -- 2. integer and FP8 weights ---------------------------------------------------------------------------


def _fp8_clip(tiny_schnell, tmp_path, torch_dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    path = root / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    fp8 = {k: (v.to(getattr(torch, torch_dtype)) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(fp8, str(path))
    return root, {k: v.to(torch.float32).numpy() for k, v in fp8.items() if v.is_floating_point()}


def test_fp8_e4m3_is_decoded_exactly(tiny_schnell, tmp_path):
    root, expected = _fp8_clip(tiny_schnell, tmp_path, "float8_e4m3fn")
    for dtype in (mx.float32, mx.bfloat16, mx.float16):  # every E4M3 value is exact in each of them
        got = params(folder.load_folder_component(root, "clip", dtype))
        assert all(v.dtype == dtype for v in got.values())
        for k, v in expected.items():
            ours = k.removeprefix("text_model.")
            np.testing.assert_array_equal(np.array(got[ours].astype(mx.float32)), v, err_msg=ours)


def test_every_e4m3_code_decodes_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from flux_1.loading.weights import read_lazy

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    save_file({"x": codes}, str(tmp_path / "x.safetensors"))
    tensors, _ = read_lazy([tmp_path / "x.safetensors"])
    got, want = np.array(tensors["x"].astype(mx.float32)), codes.to(torch.float32).numpy()
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all() and (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()


def test_fp8_e5m2_is_refused_by_name(tiny_schnell, tmp_path):
    root, _ = _fp8_clip(tiny_schnell, tmp_path, "float8_e5m2")
    with pytest.raises(WeightLoadError, match=r"model\.safetensors: '.*' is F8_E5M2, which MLX cannot read"):
        folder.load_folder_component(root, "clip", mx.float32)


def test_scaled_fp8_is_refused_by_name(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "flux1-schnell.safetensors")
    path = root / "flux1-schnell.safetensors"
    header, data = read_st(path)
    header["img_in.scale_weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    write_st(path, header, data + np.float32(0.5).tobytes())
    with pytest.raises(WeightLoadError, match=r"'img_in\.scale_weight' marks a scaled-FP8 checkpoint"):
        folder.load_folder_component(root, "transformer", mx.float32)


@pytest.mark.parametrize("swap", [("F32", "I32"), ("F32", "U32")])
def test_integer_weight_is_refused_by_name(tiny_schnell, tmp_path, swap):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    path = root / "text_encoder" / "model.safetensors"
    header, data = read_st(path)
    header["text_model.encoder.layers.0.mlp.fc2.weight"]["dtype"] = swap[1]
    write_st(path, header, data)
    with pytest.raises(
        WeightLoadError,
        match=r"'text_model\.encoder\.layers\.0\.mlp\.fc2\.weight' is u?int32, "
        r"not a floating-point weight",
    ):
        folder.load_folder_component(root, "clip", mx.float32)


# -- 3. tracebacks and hangs turned into clean errors ---------------------------------------------------------


def test_missing_architecture_key_is_named(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "flux1-schnell.safetensors")
    path = root / "flux1-schnell.safetensors"
    header, data = read_st(path)
    begin, end = header.pop("img_in.weight")["data_offsets"]
    for info in header.values():  # close the gap, as a re-saved file would
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
    write_st(path, header, data[:begin] + data[end:])
    with pytest.raises(WeightLoadError, match=r"missing key 'img_in\.weight'.*architecture is read from"):
        folder.load_folder_component(root, "transformer", mx.float32)


def test_wrong_shape_x_embedder_is_named_not_the_final_layer(tiny_schnell, tmp_path):
    from safetensors.numpy import load_file, save_file

    root = copy_component(tiny_schnell, tmp_path, "transformer")
    index = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = root / "transformer" / index["weight_map"]["x_embedder.weight"]
    tensors = load_file(str(shard))
    w = tensors["x_embedder.weight"]
    tensors["x_embedder.weight"] = np.concatenate([w, w[:, :1]], axis=1)  # one input column too many
    save_file(tensors, str(shard))
    with pytest.raises(
        WeightLoadError,
        match=r"'img_in\.weight' \(from 'x_embedder\.weight' in .*\) has shape "
        r"\(\d+, 65\): it gives in_channels = 65, where "
        r"'final_layer\.linear\.weight'.* give 64",
    ) as e:
        folder.load_folder_component(root, "transformer", mx.float32)
    assert "final_layer.linear.bias" not in str(e.value).split("where")[0]


def test_corrupt_ae_file_is_a_clean_error(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "ae.safetensors")
    (root / "ae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightLoadError, match=r"ae\.safetensors: header is not valid JSON"):
        folder.load_folder_component(root, "vae", mx.float32)


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ([["shared.weight", "model-00001-of-00002.safetensors"]], "'weight_map' must be a non-empty object"),
        ({}, "'weight_map' must be a non-empty object"),
        ({"shared.weight": 3}, r"weight_map\['shared\.weight'\] is 3, not a file name"),
        (
            {"shared.weight": "../model-00001-of-00002.safetensors"},
            r"weight_map\['shared\.weight'\] is '\.\./model-00001.*', not a file name",
        ),
        ({"shared.weight": "/etc/passwd"}, r"weight_map\['shared\.weight'\] is '/etc/passwd', not a file name"),
    ],
)
def test_bad_shard_index_is_a_clean_error(tiny_schnell, tmp_path, weight_map, message):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder_2")
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightLoadError, match=r"model\.safetensors\.index\.json: " + message):
        folder.load_folder_component(root, "t5", mx.float32)


@pytest.mark.parametrize("index", [[1, 2], "text", None])
def test_shard_index_that_is_not_an_object(tiny_schnell, tmp_path, index):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder_2")
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=r"unreadable shard index"):
        folder.load_folder_component(root, "t5", mx.float32)


def test_zero_size_tensor_is_refused_by_name(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    path = root / "text_encoder" / "model.safetensors"
    header, data = read_st(path)
    header["text_model.final_layer_norm.bias"]["shape"] = [0]
    begin, end = header["text_model.final_layer_norm.bias"]["data_offsets"]
    header["text_model.final_layer_norm.bias"]["data_offsets"] = [begin, begin]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
    write_st(path, header, data[:begin] + data[end:])
    with pytest.raises(WeightLoadError, match=r"'text_model\.final_layer_norm\.bias' is empty"):
        folder.load_folder_component(root, "clip", mx.float32)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_shard_that_is_not_a_regular_file_does_not_hang(tiny_schnell, tmp_path, kind):
    root = copy_component(tiny_schnell, tmp_path, "text_encoder_2")
    shard = root / "text_encoder_2" / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    what = "a FIFO" if kind == "fifo" else "a directory"
    with pytest.raises(WeightLoadError, match=rf"model-00002-of-00002\.safetensors: is {what}"):
        folder.load_folder_component(root, "t5", mx.float32)


def test_bfl_transformer_given_as_a_fifo_does_not_hang(tiny_schnell, tmp_path):
    root = copy_component(tiny_schnell, tmp_path, "ae.safetensors")
    os.mkfifo(root / "flux1-schnell.safetensors")
    with pytest.raises(WeightLoadError, match=r"flux1-schnell\.safetensors: is a FIFO"):
        folder.load_folder_component(root, "transformer", mx.float32)


def test_overlapping_offsets_are_refused(tiny_schnell, tmp_path):
    # mx.load would accept this and read one tensor's bytes as another's.
    root = copy_component(tiny_schnell, tmp_path, "text_encoder")
    path = root / "text_encoder" / "model.safetensors"
    header, data = read_st(path)
    a, b = "text_model.encoder.layers.0.mlp.fc1.bias", "text_model.encoder.layers.0.mlp.fc2.bias"
    header[a]["shape"] = header[b]["shape"] = [16]
    header[a]["data_offsets"] = [0, 64]
    header[b]["data_offsets"] = [32, 96]
    write_st(path, header, data)
    with pytest.raises(WeightLoadError, match=r"model\.safetensors: tensor '.*': data_offsets .*overlap"):
        folder.load_folder_component(root, "clip", mx.float32)
