"""GGUF loading (loading/gguf.py): city96-layout FLUX transformer GGUFs and llama.cpp T5 encoder GGUFs.

Fixtures are written by tests/fixtures/make_tiny_gguf.py from the tiny checkpoints, with MIXED types per
tensor (K-quants on the layers whose input width is a multiple of 256)."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

gguf = pytest.importorskip("gguf")

from flux_1 import quantization as q  # noqa: E402
from flux_1.loading import gguf as gg  # noqa: E402
from flux_1.loading import load_component, saved, tables  # noqa: E402
from flux_1.loading.weights import WeightLoadError  # noqa: E402
from tests.fixtures import make_tiny_gguf as mk  # noqa: E402

T = gguf.GGMLQuantizationType
# Relative error of a re-quantized layer against gguf-py's dequantization (MLX affine at the setting of
# gguf_quants.REQUANTIZE): the bounds of docs/QUANTIZATION.md's "Measured error" table per bit width.
REQUANT_BOUND = {8: 0.01, 6: 0.03, 5: 0.06, 4: 0.12}


@pytest.fixture(scope="module")
def files(tiny_flux, tmp_path_factory):
    root = tiny_flux("schnell")
    out = tmp_path_factory.mktemp("gguf")
    made = {"root": root}
    for profile in mk.PROFILES:
        made[profile] = out / f"{profile}.gguf"
        mk.write_transformer_gguf(root / "flux1-schnell.safetensors", made[profile], profile)
    made["t5"] = out / "t5.gguf"
    mk.write_t5_gguf(root / "text_encoder_2", made["t5"])
    return made


def our_key(component: str, gguf_name: str) -> str:
    table, renames = gg.TABLES[component]
    name = gguf_name.removeprefix("model.diffusion_model.")
    module, param = tables.split_param(name)
    return f"{tables.resolve(table, module).target}.{renames.get(param, param)}"


def dequantized(model, key: str) -> np.ndarray:
    """Our parameter `key` as float32 numpy (quantized layers dequantized with their own settings)."""
    params = dict(tree_flatten(model.parameters()))
    module = key.rpartition(".")[0]
    layer = dict(model.named_modules())[module]
    if isinstance(layer, q.QUANTIZED) and key.endswith(".weight"):
        w = mx.dequantize(params[key], params[f"{module}.scales"], params.get(f"{module}.biases"),
                          group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        return np.array(w.astype(mx.float32))
    return np.array(params[key].astype(mx.float32))


def test_lossless_types_equal_gguf_dequantize_bit_for_bit(files):
    model = gg.load_gguf_component(files["lossless"], "transformer", mx.float32)
    reader = gguf.GGUFReader(files["lossless"])
    seen = set()
    plan = q.describe(model)
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = dequantized(model, our_key("transformer", t.name))
        np.testing.assert_array_equal(ours, ref, err_msg=f"{t.name} ({t.tensor_type.name})")
        seen.add(t.tensor_type.name)
        module, _, param = our_key("transformer", t.name).rpartition(".")
        quantized = t.tensor_type.name in mk.LOSSLESS - {"F16", "F32", "BF16"}
        assert param != "weight" or (module in plan) == quantized, t.name
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "F16", "F32"} <= seen
    assert q.is_mixed(plan)  # 8-, 5- and 4-bit layers
    assert set(q.plan_summary(plan)) == {"8-bit affine (group 32)", "5-bit affine (group 32)",
                                         "4-bit affine (group 32)"}


def test_mixed_file_requantized_types_within_documented_error(files):
    model = gg.load_gguf_component(files["mixed"], "transformer", mx.float32)
    plan = q.describe(model)
    reader = gguf.GGUFReader(files["mixed"])
    checked = {}
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        key = our_key("transformer", t.name)
        ours = dequantized(model, key)
        kind = t.tensor_type.name
        if kind in mk.LOSSLESS:
            np.testing.assert_array_equal(ours, ref, err_msg=f"{t.name} ({kind})")
            continue
        bits = plan[key.rpartition(".")[0]]["bits"]
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        checked[kind] = (bits, err)
        assert err < REQUANT_BOUND[bits], f"{t.name} ({kind} -> {bits}-bit): relative error {err:.4f}"
    print("\nre-quantized:", {k: f"{b}-bit, {e:.2%}" for k, (b, e) in checked.items()})
    assert {"Q6_K", "Q3_K"} <= set(checked)


def test_prefix_and_missing_architecture_are_accepted(files, tmp_path):
    """ComfyUI-GGUF strips `model.diffusion_model.`; sd.cpp files carry no general.architecture."""
    root = files["root"]
    prefixed, bare = tmp_path / "prefixed.gguf", tmp_path / "sdcpp.gguf"
    mk.write_transformer_gguf(root / "flux1-schnell.safetensors", prefixed, "lossless", prefix="model.diffusion_model.")
    mk.write_transformer_gguf(root / "flux1-schnell.safetensors", bare, "lossless", arch=None)
    assert gg.architecture(gguf.GGUFReader(bare), bare) == "flux"
    a = dict(tree_flatten(gg.load_gguf_component(prefixed, "transformer", mx.float32).parameters()))
    b = dict(tree_flatten(gg.load_gguf_component(files["lossless"], "transformer", mx.float32).parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert gg.gguf_shapes(bare, "transformer") == gg.gguf_shapes(files["lossless"], "transformer")


def test_t5_gguf_gives_the_safetensors_embeddings(files):
    """Exact against the safetensors T5 carrying gguf-py's dequantized weights; within the quantization
    error of the types (Q8_0 ... Q4_0) against the safetensors T5 it was made from."""
    root = files["root"]
    ours = gg.load_gguf_component(files["t5"], "t5", mx.float32)
    assert q.is_mixed(q.describe(ours)) and "shared" in q.describe(ours)
    plain = load_component(root, "t5", mx.float32)
    ids = mx.array(np.arange(3, 60, dtype=np.int32)[None])
    base = np.array(plain(ids))
    reader = gguf.GGUFReader(files["t5"])
    plain.load_weights([(our_key("t5", t.name), mx.array(gguf.quants.dequantize(t.data, t.tensor_type)))
                        for t in reader.tensors])
    exact, got = np.array(plain(ids)), np.array(ours(ids))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    rel = np.linalg.norm(got - base) / np.linalg.norm(base)
    print(f"\nT5 GGUF vs safetensors T5: relative error {rel:.4f}")
    assert 0 < rel < 0.1


def test_runtime_quantize_applies_to_float_layers_only(files):
    with pytest.warns(UserWarning, match="keep the GGUF's quantization"):
        model = gg.load_gguf_component(files["mixed"], "transformer", mx.float32, q.QuantSpec(bits=4))
    plain = q.describe(gg.load_gguf_component(files["mixed"], "transformer", mx.float32))
    plan = q.describe(model)
    assert all(plan[k] == v for k, v in plain.items())  # the GGUF's layers keep theirs
    extra = set(plan) - set(plain)
    assert extra and all(plan[k]["bits"] == 4 for k in extra)  # F16/BF16 linears (txt_in, ...) got -q 4
    assert "img_in" not in plan and "final_layer.linear" not in plan  # the policy keeps these


def test_folder_with_a_gguf_and_resolve_files(files, tmp_path):
    root = files["root"]
    folder = tmp_path / "m"
    folder.mkdir()
    for sub in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        os.symlink(root / sub, folder / sub)
    shutil.copy(files["mixed"], folder / "flux1-schnell-Q4_K_S.gguf")
    found = gg.resolve_files(folder)
    assert found == {"transformer": folder / "flux1-schnell-Q4_K_S.gguf"}
    assert gg.resolve_files(root) == {}  # a full folder: its own weights
    assert gg.resolve_files(root, t5_gguf=files["t5"]) == {"t5": files["t5"]}
    with pytest.raises(WeightLoadError, match="architecture 't5encoder', not a FLUX.1 transformer"):
        gg.resolve_files(root, transformer_gguf=files["t5"])


# -- errors ---------------------------------------------------------------------------------------------


def _write(path, arch, tensors):
    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, data, kind in tensors:
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_errors_name_the_file_and_tensor(files, tmp_path):
    llama = _write(tmp_path / "llama.gguf", "llama", [("token_embd.weight", np.ones((4, 32), np.float32), T.F32)])
    with pytest.raises(WeightLoadError, match=r"llama\.gguf: a GGUF for architecture 'llama', not a FLUX"):
        gg.load_gguf_component(llama, "transformer", mx.float32)
    with pytest.raises(WeightLoadError, match="not a T5 encoder"):
        gg.load_gguf_component(files["lossless"], "t5", mx.float32)

    # an unsupported tensor type (Q8_1 has a block layout but no conversion)
    bad = _write(tmp_path / "q81.gguf", "flux", [("double_blocks.0.img_attn.qkv.weight",
                                                 np.zeros((192, 2 * 40), np.uint8), T.Q8_1)])
    with pytest.raises(WeightLoadError, match=r"q81\.gguf: tensor 'double_blocks\.0\.img_attn\.qkv\.weight' \(Q8_1"):
        gg.load_gguf_component(bad, "transformer", mx.float32)

    foreign = _write(tmp_path / "foreign.gguf", "flux", [("img_in.weight", np.ones((64, 64), np.float16), T.F16),
                                                         ("model.up.0.weight", np.ones((4,), np.float32), T.F32)])
    with pytest.raises(WeightLoadError, match="foreign.gguf: unexpected tensor|foreign.gguf: .*missing"):
        gg.load_gguf_component(foreign, "transformer", mx.float32)

    data = files["mixed"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(WeightLoadError, match=r"cut\.gguf: unreadable or truncated GGUF"):
        gg.load_gguf_component(cut, "transformer", mx.float32)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(WeightLoadError, match=r"head\.gguf: unreadable or truncated"):
        gg.gguf_shapes(head, "transformer")

    with pytest.raises(WeightLoadError, match="is a folder, not a GGUF file"):
        gg.load_gguf_component(tmp_path, "transformer", mx.float32)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(WeightLoadError, match="is a FIFO, not a GGUF file"):
        gg.load_gguf_component(fifo, "transformer", mx.float32)
    with pytest.raises(WeightLoadError, match="does not exist"):
        gg.load_gguf_component(tmp_path / "none.gguf", "transformer", mx.float32)


def test_tensor_count_and_shape_mismatch(files, tmp_path):
    reader = gguf.GGUFReader(files["lossless"])
    tensors = [(t.name, np.array(t.data), t.tensor_type) for t in reader.tensors]
    short = _write(tmp_path / "short.gguf", "flux", [t for t in tensors if t[0] != "single_blocks.1.linear2.weight"])
    with pytest.raises(WeightLoadError, match=r"short\.gguf: missing key\(s\) \['single_blocks\.1\.linear2\.weight'\]"):
        gg.load_gguf_component(short, "transformer", mx.float32)
    wrong = [(n, (np.ones((64, 48), np.float32) if n == "double_blocks.1.img_attn.proj.weight" else d),
              (T.F32 if n == "double_blocks.1.img_attn.proj.weight" else k)) for n, d, k in tensors]
    wrong = _write(tmp_path / "wrong.gguf", "flux", wrong)
    with pytest.raises(WeightLoadError, match=r"wrong\.gguf.*double_blocks\.1\.img_attn\.proj\.weight.*\(64, 48\)"):
        gg.load_gguf_component(wrong, "transformer", mx.float32)


# -- save.py round trip, memory ---------------------------------------------------------------------------


def test_save_writes_the_mixed_plan_and_reloads_it_bit_exactly(files, tmp_path):
    from flux_1.pipeline.save_model import save_model

    out = save_model(tmp_path / "saved", "schnell", source=files["root"], precision="float32",
                     transformer_gguf=files["mixed"], t5_gguf=files["t5"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "mixed"
    assert manifest["quantization"]["gguf_types"]["transformer"]["Q6_K"] == 1
    meta, _ = saved.read_header(out / "transformer" / "model.safetensors")
    assert meta["bits"] == "mixed" and json.loads(meta["layers"])
    for component, path in (("transformer", files["mixed"]), ("t5", files["t5"])):
        a = gg.load_gguf_component(path, component, mx.float32)
        b = load_component(out, component, mx.float32)
        assert q.describe(a) == q.describe(b)
        pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert pa.keys() == pb.keys()
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item(), k
            assert np.array(pa[k]).tobytes() == np.array(pb[k]).tobytes(), k  # bit for bit (-0.0 too)


def test_loading_a_q4k_gguf_peaks_near_its_file_size(files):
    path = files["q4k"]
    size = path.stat().st_size
    gc_model = gg.load_gguf_component(path, "transformer", mx.float32)  # warm up kernels and caches
    float_bytes = sum(int(np.prod(s)) * 4 for s in gg.gguf_shapes(path, "transformer").values())
    del gc_model
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model = gg.load_gguf_component(path, "transformer", mx.float32)
    peak = mx.get_peak_memory() - base
    loaded = q.parameter_bytes(model)
    print(f"\nQ4_K GGUF: file {size / 1e3:.0f} kB, loaded {loaded / 1e3:.0f} kB, peak {peak / 1e3:.0f} kB, "
          f"float32 {float_bytes / 1e3:.0f} kB")
    assert peak < 1.5 * loaded + 64 * 1024
    assert peak < 0.75 * float_bytes
