"""Loading from the diffusers layout and BFL single files: equivalence and every loading fault."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.loading import folder
from flux_1.loading.weights import WeightLoadError
from flux_1.pipeline import sampler
from tests.fixtures.make_tiny_checkpoints import write_tiny_flux


@pytest.fixture(scope="module")
def bfl_dev(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("bfl") / "dev", "dev", bfl=True)


def _without(root, tmp_path, *names):
    """A copy of the checkpoint with some entries removed."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for name in names:
        target = copy / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return copy


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_bfl_single_files_give_identical_weights(bfl_dev, tmp_path, component):
    diffusers = dict(tree_flatten(folder.load_folder_component(bfl_dev, component, mx.float32).parameters()))
    only_bfl = _without(bfl_dev, tmp_path, "transformer", "vae")
    bfl = dict(tree_flatten(folder.load_folder_component(only_bfl, component, mx.float32).parameters()))
    assert diffusers.keys() == bfl.keys()
    for k in diffusers:
        assert mx.array_equal(diffusers[k], bfl[k]), k


def test_bfl_single_files_give_identical_outputs(bfl_dev, tmp_path):
    only_bfl = _without(bfl_dev, tmp_path, "transformer", "vae")
    outs = []
    for root in (bfl_dev, only_bfl):
        model = folder.load_folder_component(root, "transformer", mx.float32)
        p = model.params
        rng = np.random.default_rng(0)
        img = mx.array(rng.standard_normal((1, 6, p.in_channels)).astype(np.float32))
        txt = mx.array(rng.standard_normal((1, 5, p.context_dim)).astype(np.float32))
        vec = mx.array(rng.standard_normal((1, p.vec_dim)).astype(np.float32))
        outs.append(np.array(model(img, txt, vec, mx.array([0.5]), sampler.image_ids(32, 48), sampler.text_ids(5),
                                   guidance=mx.array([3.5]))))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_architecture_is_read_off_the_weights(bfl_dev):
    model = folder.load_folder_component(bfl_dev, "transformer", mx.float32)
    assert model.params.guidance_embed  # dev
    assert len(model.double_blocks) == 2 and len(model.single_blocks) == 2
    assert model.params.head_dim == 32 and model.params.axes_dim == (4, 14, 14)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loads_half_precision_checkpoints(tmp_path, dtype):
    root = write_tiny_flux(tmp_path / dtype, "schnell", dtype=dtype)
    model = folder.load_folder_component(root, "transformer", mx.float32)
    assert model.img_in.weight.dtype == mx.float32
    model = folder.load_folder_component(root, "t5", mx.bfloat16)
    assert model.shared.weight.dtype == mx.bfloat16


def test_missing_component_folder_is_named(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path, "text_encoder_2")
    with pytest.raises(WeightLoadError, match=r"missing component folder text_encoder_2/"):
        folder.load_folder_component(copy, "t5", mx.float32)


def test_missing_model_path(tmp_path):
    with pytest.raises(WeightLoadError, match="does not exist"):
        folder.load_folder_component(tmp_path / "nowhere", "transformer", mx.float32)


def test_truncated_shard_names_the_file(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path)
    shard = copy / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=r"diffusion_pytorch_model-00002-of-00002\.safetensors.*truncated"):
        folder.load_folder_component(copy, "transformer", mx.float32)


def test_shard_listed_in_index_but_absent(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path, "text_encoder_2/model-00002-of-00002.safetensors")
    with pytest.raises(WeightLoadError, match=r"lists model-00002-of-00002\.safetensors, which is missing"):
        folder.load_folder_component(copy, "t5", mx.float32)


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_key_is_named(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path)
    _rewrite(copy / "vae" / "diffusion_pytorch_model.safetensors",
             lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(WeightLoadError, match=r"missing key\(s\) \['decoder\.conv_out\.bias'\]"):
        folder.load_folder_component(copy, "vae", mx.float32)


def test_missing_part_of_a_fused_layer_is_named(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path)
    index = json.loads((copy / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = copy / "transformer" / index["weight_map"]["transformer_blocks.1.attn.to_k.weight"]
    _rewrite(shard, lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"))
    missing_k = r"missing part\(s\) \[1\] of fused 'double_blocks\.1\.img_attn\.qkv\.weight'"
    with pytest.raises(WeightLoadError, match=missing_k):
        folder.load_folder_component(copy, "transformer", mx.float32)


def test_unexpected_key_is_named(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path)
    _rewrite(copy / "text_encoder" / "model.safetensors",
             lambda t: t.__setitem__("text_model.encoder.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(WeightLoadError, match=r"unexpected key.*encoder\.layers\.0\.extra\.weight"):
        folder.load_folder_component(copy, "clip", mx.float32)


def test_wrong_shape_names_key_and_shapes(bfl_dev, tmp_path):
    copy = _without(bfl_dev, tmp_path)

    def widen(t):
        t["text_model.encoder.layers.1.mlp.fc2.bias"] = np.ones(65, np.float32)

    _rewrite(copy / "text_encoder" / "model.safetensors", widen)
    with pytest.raises(WeightLoadError, match=r"text_encoder: 'encoder\.layers\.1\.mlp\.fc2\.bias' has shape \(65,\), "
                                              r"expected \(64,\)"):
        folder.load_folder_component(copy, "clip", mx.float32)
