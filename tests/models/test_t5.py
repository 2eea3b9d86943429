"""T5 encoder: parity with transformers' T5EncoderModel (tiny, float32), shapes of the full model, bf16."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.models.t5 import T5Encoder, T5Params, relative_position_bucket
from tests.helpers import rel_err

# d_model != num_heads * d_kv on purpose, as T5 allows; 3 blocks so the shared bias is reused.
TINY = T5Params(vocab_size=320, d_model=48, d_kv=8, num_heads=4, d_ff=80, num_layers=3)
# t5-v1_1-xxl as transformers configures it.
XXL_CONFIG = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "num_heads": 64,
    "d_ff": 10240,
    "num_layers": 24,
}


def _reference(params: T5Params):
    """A seeded transformers T5EncoderModel whose norms and position bias are far from their defaults."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=params.vocab_size,
        d_model=params.d_model,
        d_kv=params.d_kv,
        num_heads=params.num_heads,
        d_ff=params.d_ff,
        num_layers=params.num_layers,
        relative_attention_num_buckets=params.relative_attention_num_buckets,
        relative_attention_max_distance=params.relative_attention_max_distance,
        layer_norm_epsilon=params.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # the default std d_model**-0.5 barely moves the scores
    return model


def _our_weights(state_dict) -> dict[str, np.ndarray]:
    """transformers' state_dict under our names: the identity, less the embed_tokens alias."""
    return {k: v.float().numpy() for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}


def _ids(batch: int, length: int, vocab: int) -> np.ndarray:
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, length), dtype=np.int32)
    ids[:, -4:] = vocab - 1 - np.arange(4)  # the end of the vocabulary
    ids[1, 10:20] = 0  # a run of padding (T5's pad id), attended like the reference
    return ids


def _loaded(params: T5Params, weights: dict[str, np.ndarray], dtype=mx.float32) -> T5Encoder:
    model = T5Encoder(params)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()], strict=True)
    return model


def test_relative_position_bucket_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-400, 401)
    for num_buckets, max_distance in [(32, 128), (32, 20), (64, 256)]:
        ref = T5Attention._relative_position_bucket(torch.tensor(relative), True, num_buckets, max_distance)
        ours = relative_position_bucket(mx.array(relative), num_buckets, max_distance)
        np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_parity_with_transformers_float32():
    torch = pytest.importorskip("torch")
    ref_model = _reference(TINY)
    ids = _ids(2, 160, TINY.vocab_size)  # L = 160 > max_distance: every bucket, the far ones included
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()

    ours = _loaded(TINY, _our_weights(ref_model.state_dict()))(mx.array(ids))
    assert ours.dtype == mx.float32
    assert rel_err(ours, ref) <= 1e-4


def test_bfloat16_stays_close_to_float32():
    pytest.importorskip("torch")
    weights = _our_weights(_reference(TINY).state_dict())
    ids = mx.array(_ids(2, 40, TINY.vocab_size))
    full = _loaded(TINY, weights)(ids)
    half = _loaded(TINY, weights, mx.bfloat16)(ids)
    assert half.dtype == mx.bfloat16
    assert rel_err(half.astype(mx.float32), full) <= 3e-2


def test_from_shapes_round_trip():
    shapes = {k: v.shape for k, v in tree_flatten(T5Encoder(TINY).parameters())}
    assert T5Params.from_shapes(shapes) == TINY
    other = T5Params(
        vocab_size=100,
        d_model=32,
        d_kv=4,
        num_heads=2,
        d_ff=40,
        num_layers=1,
        relative_attention_num_buckets=16,
    )
    shapes = {k: v.shape for k, v in tree_flatten(T5Encoder(other).parameters())}
    assert T5Params.from_shapes(shapes) == other


def test_full_size_names_and_shapes_match_t5_v1_1_xxl():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(**XXL_CONFIG, feed_forward_proj="gated-gelu")
    with torch.device("meta"):  # nothing allocated
        ref = transformers.T5EncoderModel(config)
    ref_shapes = {
        k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"
    }

    # MLX arrays are lazy: building and reading .shape never allocates the 4.76B parameters.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(T5Encoder(T5Params()).parameters())}
    assert ours == ref_shapes
    assert T5Params.from_shapes(ours) == T5Params()
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in ref.parameters())
    assert 4.75e9 < count < 4.77e9
