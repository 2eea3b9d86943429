"""components.py: the one registry of components, tokenizer folders and precisions."""

import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from flux_1 import quantization as q
from flux_1.components import COMPONENTS, PRECISIONS, component, precision_dtype, require_tokenizers
from flux_1.loading import load_component
from flux_1.loading.weights import WeightLoadError


def test_every_component_builds_from_its_own_shapes():
    # The registry's model and params classes agree: a default model's shapes give back its params.
    for name, facts in COMPONENTS.items():
        params = facts.params(guidance_embed=True) if name == "transformer" else facts.params()
        shapes = {k: tuple(v.shape) for k, v in tree_flatten(facts.model(params).parameters())}
        assert facts.build(shapes).params == params, name


def test_policy_names_exist_in_each_model(tiny_schnell):
    # Names the quantization policy keeps or quantizes are real modules (a typo would silently do nothing).
    for name, facts in COMPONENTS.items():
        modules = dict(load_component(tiny_schnell, name, mx.float32).named_modules())
        for module in (*facts.keep_full_precision, *facts.quantized_embeddings):
            assert module in modules, (name, module)
        plan = q.layer_plan(load_component(tiny_schnell, name, mx.float32), name, q.parse(8))
        assert not set(plan) & set(facts.keep_full_precision)
        assert set(facts.quantized_embeddings) <= set(plan)
        assert bool(plan) == facts.quantizable, name


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        component("unet")
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*bfloat16"):
        precision_dtype("fp8")
    assert precision_dtype("float32") == mx.float32 and set(PRECISIONS) == {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("sub,remove", [("tokenizer", "*"), ("tokenizer_2", "*"), ("tokenizer", "merges.txt"),
                                        ("tokenizer", None)])
def test_incomplete_tokenizer_folders_are_named(tiny_schnell, tmp_path, sub, remove):
    root = tmp_path / "model"
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_schnell / name, root / name)
    require_tokenizers(root)  # complete: passes
    if remove is None:
        shutil.rmtree(root / sub)
        match = f"missing component folder {sub}/"
    else:
        for f in (root / sub).glob(remove):
            f.unlink()
        match = f"{sub}: incomplete tokenizer"
    with pytest.raises(WeightLoadError, match=match):
        require_tokenizers(root)
