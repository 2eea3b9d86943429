"""Folders written by save.py: round trip against runtime quantization, sizes, the committed v1 fixture,
format errors, atomic writes, and LoRAs baked before quantization."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

import flux_1.pipeline.save_model
from flux_1 import Config, Flux1
from flux_1 import quantization as q
from flux_1.components import COMPONENTS, TOKENIZERS
from flux_1.loading import folder, saved
from flux_1.loading.weights import WeightLoadError
from flux_1.pipeline.save_model import save_model

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "saved_v1"
CONFIG = dict(num_inference_steps=2, height=32, width=32)
PROMPT = "a red boat on a calm sea"


def image(root, quantize=None, precision="float32", **kwargs) -> np.ndarray:
    flux = Flux1.from_alias("schnell", path=root, quantize=quantize, precision=precision, **kwargs)
    return np.asarray(flux.generate_image(3, PROMPT, Config(**CONFIG), progress=False).image)


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def same_params(a, b) -> bool:
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item() for k in pa)


@pytest.fixture(scope="module")
def saved4(tiny_schnell, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "schnell-q4"
    return save_model(out, "schnell", source=tiny_schnell, quantize=4, precision="float32")


# -- round trip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["4", "nvfp4", None])
def test_save_then_load_equals_runtime_quantization(tiny_schnell, saved4, tmp_path, label):
    out = saved4 if label == "4" else save_model(tmp_path / "out", "schnell", source=tiny_schnell,
                                                 quantize=label, precision="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == (q.parse(label).as_dict() if label else None)
    assert (manifest["model"], manifest["precision"], manifest["format_version"]) == ("schnell", "float32", 1)
    for component in ("transformer", "t5", "clip", "vae"):
        runtime = folder.load_folder_component(tiny_schnell, component, mx.float32, q.parse(label))
        assert same_params(saved.load_saved_component(out, component, mx.float32), runtime), component
    if label == "4":  # equal parameters draw equal images; check it once, end to end
        assert np.array_equal(image(out), image(tiny_schnell, label))  # no -q needed: the folder says how


def test_bfloat16_round_trip(tiny_flux, tmp_path):
    source = tiny_flux("schnell", "bfloat16", bfl=False)
    out = save_model(tmp_path / "out", "schnell", source=source, quantize=8)  # default precision bfloat16
    for component in ("transformer", "clip"):
        loaded = saved.load_saved_component(out, component, mx.bfloat16)
        assert same_params(loaded, folder.load_folder_component(source, component, mx.bfloat16, q.parse(8)))
        assert {v.dtype for v in params(loaded).values()} <= {mx.bfloat16, mx.uint32}


def test_full_precision_folder_is_quantized_at_load(tiny_schnell, tmp_path):
    out = save_model(tmp_path / "fp", "schnell", source=tiny_schnell, precision="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to disagree with: no warning
        model = saved.load_saved_component(out, "transformer", mx.float32, q.parse(5))
    assert same_params(model, folder.load_folder_component(tiny_schnell, "transformer", mx.float32, q.parse(5)))


def _data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def test_saved_size_matches_the_plan(tiny_schnell, saved4):
    """Bytes on disk = codes (out * in * bits / 8) + scales and biases (2 per group, float32 here)
    + full-precision tensors, for the layers of the policy's plan, from the source's shapes."""
    manifest = json.loads((saved4 / "manifest.json").read_text())
    spec = q.QuantSpec(bits=4)
    for component, sub in ((c, f.folder) for c, f in COMPONENTS.items()):
        source = folder.find_source(tiny_schnell, component)
        model = folder.build(component, folder.find_source(tiny_schnell, component), mx.float32)
        plan = q.layer_plan(model, component, spec)
        expected = 0
        for key, value in source.weights.items():
            module, _, param = key.rpartition(".")
            shape = value.shape if value.ndim != 4 else value.shape  # convs: same count either layout
            if module in plan and param == "weight":
                out_f, in_f = shape
                expected += out_f * in_f * 4 // 8 + 2 * out_f * (in_f // plan[module]["group_size"]) * 4
            else:
                expected += int(np.prod(shape)) * 4
        files = list((saved4 / sub).glob("*.safetensors"))
        written = sum(_data_bytes(f) for f in files)
        assert written == expected == manifest["components"][component]["tensor_bytes"]
        meta, _ = saved.read_header(files[0])
        assert json.loads(meta["layers"]) == plan
        assert (meta["bits"], meta["mode"], meta["format_version"]) == (("4", "affine", "1") if plan else
                                                                        ("none", "none", "1"))
    for sub in TOKENIZERS:
        copied, original = (sorted(p.name for p in (f / sub).iterdir()) for f in (saved4, tiny_schnell))
        assert copied == original


def test_shards_at_most_the_limit(tiny_schnell, saved4, tmp_path):
    limit = 60_000
    out = save_model(tmp_path / "sharded", "schnell", source=tiny_schnell, quantize=4, precision="float32",
                     max_shard_bytes=limit)
    files = sorted((out / "transformer").glob("model-*-of-*.safetensors"))
    assert len(files) > 2 and (out / "transformer" / saved.INDEX).exists()
    index = json.loads((out / "transformer" / saved.INDEX).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:
        _, header = saved.read_header(f)
        biggest_module = max(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        assert _data_bytes(f) <= max(limit, biggest_module * 3)
    for component in ("transformer", "t5"):
        assert same_params(saved.load_saved_component(out, component, mx.float32),
                           saved.load_saved_component(saved4, component, mx.float32))


# -- the committed fixture (format version 1) ---------------------------------------------------------------


def test_committed_v1_fixture_still_loads_and_draws_the_same_image():
    expected = np.load(FIXTURE / "expected_output.npz")
    settings = json.loads(str(expected["settings"]))
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["quantization"]["bits"] == 4
    total = sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file())
    assert total < 1.1e6
    flux = Flux1.from_alias("schnell", path=FIXTURE, precision=settings["precision"])
    assert flux.quantization == {"bits": 4, "group_size": 32, "mode": "affine"}  # hidden 32: group 32
    assert q.describe(flux.transformer) == json.loads(saved.read_header(
        FIXTURE / "transformer" / "model.safetensors")[0]["layers"])
    result = flux.generate_image(settings["seed"], settings["prompt"],
                                 Config(num_inference_steps=settings["steps"], height=settings["height"],
                                        width=settings["width"]), progress=False)
    pixels = np.asarray(result.image)
    # Exact on the backend that made it; other backends round differently (well under 1/255 on average).
    diff = np.abs(pixels.astype(np.int16) - expected["pixels"].astype(np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    if mx.default_device() == mx.cpu:
        assert np.array_equal(pixels, expected["pixels"])


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "saved_v1"))


def test_unknown_format_version_is_a_clear_error(fixture_copy):
    manifest = json.loads((fixture_copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (fixture_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(saved.SavedFormatError, match="format version 2 is not supported"):
        Flux1.from_alias("schnell", path=fixture_copy)
    with pytest.raises(WeightLoadError, match="format version 2"):
        saved.load_saved_component(fixture_copy, "vae", mx.float32)


def test_shard_of_unknown_version_is_refused(fixture_copy):
    path = fixture_copy / "text_encoder" / "model.safetensors"
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, metadata={**meta, "format_version": "7"})
    with pytest.raises(saved.SavedFormatError, match="format version '7'"):
        saved.load_saved_component(fixture_copy, "clip", mx.float32)


def test_foreign_or_broken_manifest(fixture_copy):
    (fixture_copy / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(saved.SavedFormatError, match="not a flux_1.saved manifest"):
        saved.read_manifest(fixture_copy)
    (fixture_copy / "manifest.json").write_text("{not json")
    with pytest.raises(saved.SavedFormatError, match="unreadable manifest"):
        saved.read_manifest(fixture_copy)


def test_q_that_disagrees_with_the_saved_bits_warns_and_saved_bits_win(fixture_copy):
    with pytest.warns(UserWarning, match=r"saved quantized \(4-bit affine.*ignoring -q 8") as caught:
        flux = Flux1.from_alias("schnell", path=fixture_copy, quantize=8, precision="float32")
    assert len([w for w in caught if "ignoring -q" in str(w.message)]) == 1  # once, not per component
    assert {how["bits"] for how in q.describe(flux.transformer).values()} == {4}
    assert flux.quantization["bits"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Flux1.from_alias("schnell", path=fixture_copy, quantize=4, precision="float32")  # agrees: silent


# -- atomic writes ------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_non_empty_output_is_refused_without_overwrite(tiny_schnell, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(saved.SaveError, match="not empty; pass --overwrite"):
        save_model(out, "schnell", source=tiny_schnell, quantize=4, precision="float32")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_model(out, "schnell", source=tiny_schnell, quantize=4, precision="float32", overwrite=True)
    assert not (out / "keep.txt").exists() and saved.is_saved_folder(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(empty, "schnell", source=tiny_schnell, precision="float32")  # an empty folder is fine
    assert saved.is_saved_folder(empty) and not _leftovers(tmp_path)
    with pytest.raises(saved.SaveError, match="is not a folder"):
        save_model(out / "manifest.json", "schnell", source=tiny_schnell)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_nothing(tiny_schnell, tmp_path, monkeypatch, exc):
    real = saved.write_component
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the transformer is written, then the T5 write fails midway
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(flux_1.pipeline.save_model, "write_component", failing)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        save_model(out, "schnell", source=tiny_schnell, quantize=4, precision="float32")
    assert not out.exists() and not _leftovers(tmp_path)

    # An existing folder being overwritten is left exactly as it was.
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    calls.clear()
    with pytest.raises(type(exc)):
        save_model(out, "schnell", source=tiny_schnell, quantize=4, precision="float32", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not _leftovers(tmp_path)


def test_output_inside_source_and_requantizing_are_refused(tiny_schnell, fixture_copy, tmp_path):
    with pytest.raises(saved.SaveError, match="source"):
        save_model(tiny_schnell / "saved", "schnell", source=tiny_schnell)
    with pytest.raises(saved.SaveError, match="already quantized"):
        save_model(tmp_path / "q8", "schnell", source=fixture_copy, quantize=8)
    with pytest.raises(FileNotFoundError):
        save_model(tmp_path / "x", "schnell", source=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model"):
        save_model(tmp_path / "x", "pro", source=tiny_schnell)


# -- LoRAs ----------------------------------------------------------------------------------------------


def write_lora(path: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]]:
    """A small LoRA on two transformer layers (one with a bias delta) and one CLIP layer; returns the
    expected (weight delta, bias delta) per (component, module)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) / 4).astype(np.float32)

    t, expected = {}, {}
    down, up = r(4, 64), r(64, 4)
    t["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"] = down
    t["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"] = up
    expected["transformer", "double_blocks.0.img_attn.proj"] = (up @ down, None)
    down, up, bias = r(2, 64), r(192, 2), r(192)
    t["single_blocks.0.modulation.lin.lora_A.weight"] = down
    t["single_blocks.0.modulation.lin.lora_B.weight"] = up
    t["single_blocks.0.modulation.lin.lora_B.bias"] = bias
    expected["transformer", "single_blocks.0.modulation.lin"] = (up @ down, bias)
    stem = "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1"
    down, up = r(2, 64), r(128, 2)
    t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, up
    t[f"{stem}.alpha"] = np.array(1.0, np.float32)
    expected["clip", "encoder.layers.1.mlp.fc1"] = (0.5 * up @ down, None)
    save_file(t, str(path))
    return expected


def test_loras_are_merged_into_full_precision_weights_then_quantized(tiny_schnell, tmp_path):
    lora = tmp_path / "style.safetensors"
    deltas = write_lora(lora)
    scale = 0.8
    fp = save_model(tmp_path / "fp", "schnell", source=tiny_schnell, precision="float32",
                    lora_paths=[lora], lora_scales=[scale])
    q8 = save_model(tmp_path / "q8", "schnell", source=tiny_schnell, quantize=8, precision="float32",
                    lora_paths=[lora], lora_scales=[scale])
    manifest = json.loads((q8 / "manifest.json").read_text())
    assert manifest["loras"] == [{"path": str(lora.resolve()), "name": lora.name, "scale": scale}]

    for component in ("transformer", "clip"):
        base = params(folder.load_folder_component(tiny_schnell, component, mx.float32))
        merged_model = saved.load_saved_component(fp, component, mx.float32)
        merged = params(merged_model)
        assert merged.keys() == base.keys()  # plain layers, our names: no LoRA left in the folder
        for key in base:
            module, _, param = key.rpartition(".")
            if (component, module) in deltas:
                dw, db = deltas[component, module]
                delta = dw if param == "weight" else (db if db is not None else 0)
                want = np.array(base[key]) + scale * delta
                np.testing.assert_allclose(np.array(merged[key]), want, rtol=0, atol=1e-5)
            else:
                assert mx.array_equal(merged[key], base[key]).item(), key
        # The quantized folder holds exactly the codes of quantizing the merged full-precision weights.
        q.quantize_loaded(merged_model, q.layer_plan(merged_model, component, q.parse(8)))
        assert same_params(saved.load_saved_component(q8, component, mx.float32), merged_model), component

    # The baked folder draws what the runtime LoRA (side path, no quantization) draws.
    runtime = image(tiny_schnell, lora_paths=[str(lora)], lora_scales=[scale])
    assert np.abs(image(fp).astype(int) - runtime).max() <= 1
    assert np.abs(image(q8).astype(float) - runtime).mean() < 1.0
    assert np.abs(image(tiny_schnell).astype(float) - runtime).mean() > 1.0  # the LoRA does something


@pytest.mark.parametrize("scale", [1e39, -1e39])  # finite numbers, but the merged weights overflow
def test_lora_that_overflows_is_refused_and_nothing_is_written(tiny_schnell, tmp_path, scale):
    lora = tmp_path / "style.safetensors"
    write_lora(lora)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="overflow|not finite|takes weights past"):
        save_model(out, "schnell", source=tiny_schnell, precision="bfloat16", lora_paths=[lora], lora_scales=[scale])
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("quantize", [None, 8])
def test_non_finite_merged_weight_is_never_written(tiny_schnell, tmp_path, monkeypatch, quantize):
    """Whatever the LoRA checks let through, a non-finite weight after merging stops the save, by name."""
    lora = tmp_path / "style.safetensors"
    write_lora(lora)
    real = flux_1.pipeline.save_model.bake

    def bake_inf(model):
        n = real(model)
        if hasattr(model, "double_blocks"):
            w = model.double_blocks[0].img_attn.proj.weight
            model.double_blocks[0].img_attn.proj.weight = mx.where(mx.arange(w.size).reshape(w.shape) == 5,
                                                                    mx.array(float("inf"), w.dtype), w)
        return n

    monkeypatch.setattr(flux_1.pipeline.save_model, "bake", bake_inf)
    out = tmp_path / "out"
    with pytest.raises(saved.SaveError, match=r"transformer: 'double_blocks.0.img_attn.proj.weight' is not finite "
                                              r"after merging the LoRAs \(it overflows float32"):
        save_model(out, "schnell", source=tiny_schnell, precision="float32", quantize=quantize,
                   lora_paths=[lora], lora_scales=[0.5])
    assert not out.exists() and not _leftovers(tmp_path)


def test_check_folder(fixture_copy):
    assert saved.check_folder(fixture_copy)["model"] == "schnell"
    shutil.rmtree(fixture_copy / "tokenizer_2")
    with pytest.raises(WeightLoadError, match="tokenizer_2"):
        saved.check_folder(fixture_copy)
    (fixture_copy / "vae" / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="vae"):
        saved.check_folder(fixture_copy)


def test_corrupt_layer_plan_is_a_clear_error(fixture_copy):
    path = fixture_copy / "transformer" / "model.safetensors"
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, metadata={**meta, "layers": '{"img_in": {"bits": 4}}'})
    with pytest.raises(saved.SavedFormatError, match="unreadable quantization metadata"):
        saved.load_saved_component(fixture_copy, "transformer", mx.float32)
    plan = json.loads(meta["layers"])
    plan["img_in"] = plan["txt_in"]  # a layer the policy never quantized: the codes do not fit
    mx.save_safetensors(str(path), arrays, metadata={**meta, "layers": json.dumps(plan)})
    with pytest.raises(saved.SavedFormatError, match="quantizes 'img_in' but its weight is"):
        saved.load_saved_component(fixture_copy, "transformer", mx.float32)
