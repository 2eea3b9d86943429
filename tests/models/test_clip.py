"""CLIP text encoder: parity with transformers' CLIPTextModel (tiny, float32), full-size shapes, bf16."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.models.clip import CLIPParams, CLIPTextModel
from tests.helpers import rel_err

TINY = CLIPParams(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, max_positions=77, head_dim=16
)
# openai/clip-vit-large-patch14's text tower as transformers configures it.
CLIP_L_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 2,
}


def _reference(params: CLIPParams):
    """A seeded transformers CLIPTextModel with FLUX.1's legacy eos_token_id = 2 and perturbed norms."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        max_position_embeddings=params.max_positions,
        layer_norm_eps=params.layer_norm_eps,
        hidden_act="quick_gelu",
        bos_token_id=params.vocab_size - 2,  # the default, 49406, is outside the tiny vocabulary
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)  # transformers starts biases at zero
    return model


def _our_weights(state_dict) -> dict[str, np.ndarray]:
    """transformers' state_dict under our names: strip `text_model.` (transformers 4 and FLUX.1's files)."""
    return {k.removeprefix("text_model."): v.float().numpy() for k, v in state_dict.items()}


def _ids(vocab: int) -> np.ndarray:
    """Token rows as CLIP's tokenizer writes them: BOS, text, EOS (the largest id), then EOS as padding."""
    eos = vocab - 1
    rng = np.random.default_rng(0)
    ids = np.full((3, 77), eos, dtype=np.int32)
    for row, end in enumerate([5, 40, 76]):  # EOS at different positions; the last row has no padding
        ids[row, :end] = rng.integers(vocab - 40, eos, size=end)  # ids near the end of the vocabulary
        ids[row, 0] = vocab - 2  # BOS
    return ids


def _loaded(params: CLIPParams, weights: dict[str, np.ndarray], dtype=mx.float32) -> CLIPTextModel:
    model = CLIPTextModel(params)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()], strict=True)
    return model


def test_parity_with_transformers_float32():
    torch = pytest.importorskip("torch")
    ref_model = _reference(TINY)
    ids = _ids(TINY.vocab_size)
    with torch.no_grad():
        out = ref_model(input_ids=torch.from_numpy(ids).long())

    hidden, pooled = _loaded(TINY, _our_weights(ref_model.state_dict()))(mx.array(ids))
    assert hidden.dtype == pooled.dtype == mx.float32
    assert rel_err(hidden, out.last_hidden_state.numpy()) <= 1e-4
    assert rel_err(pooled, out.pooler_output.numpy()) <= 1e-4
    # The pooled row is the first EOS, not a padding EOS after it (those differ under the causal mask).
    np.testing.assert_array_equal(np.array(pooled), np.array(hidden)[[0, 1, 2], [5, 40, 76]])


def test_bfloat16_stays_close_to_float32():
    pytest.importorskip("torch")
    weights = _our_weights(_reference(TINY).state_dict())
    ids = mx.array(_ids(TINY.vocab_size))
    full = _loaded(TINY, weights)(ids)
    half = _loaded(TINY, weights, mx.bfloat16)(ids)
    for h, f in zip(half, full, strict=True):
        assert h.dtype == mx.bfloat16
        assert rel_err(h.astype(mx.float32), f) <= 3e-2


def test_from_shapes_round_trip():
    shapes = {k: v.shape for k, v in tree_flatten(CLIPTextModel(TINY).parameters())}
    assert CLIPParams.from_shapes(shapes) == CLIPParams(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, max_positions=77
    )  # head_dim is not in the weights: FLUX.1's 64
    other = CLIPParams(vocab_size=100, hidden_size=128, intermediate_size=200, num_layers=1, max_positions=20)
    shapes = {k: v.shape for k, v in tree_flatten(CLIPTextModel(other).parameters())}
    assert CLIPParams.from_shapes(shapes) == other


def test_full_size_names_and_shapes_match_clip_l():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # nothing allocated
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L_CONFIG))
    ref_shapes = {k.removeprefix("text_model."): tuple(v.shape) for k, v in ref.named_parameters()}

    ours = {k: tuple(v.shape) for k, v in tree_flatten(CLIPTextModel(CLIPParams()).parameters())}
    assert CLIPParams().num_heads == 12
    assert ours == ref_shapes
    assert CLIPParams.from_shapes(ours) == CLIPParams()
    count = sum(int(np.prod(s)) for s in ours.values())
    assert 122e6 < count < 124e6
