import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.loading.tables import DIFFUSERS_TRANSFORMER, resolve, split_param
from flux_1.loading.weights import convert, shapes_of
from flux_1.models.transformer import FluxParams, FluxTransformer, apply_rope, rope, timestep_embedding
from tests.helpers import rel_err

TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=64, axes_dims_rope=(4, 14, 14))


def test_axes_follow_head_dim():
    assert FluxParams().axes_dim == (16, 56, 56)
    assert FluxParams(hidden_size=64, num_heads=2).axes_dim == (4, 14, 14)


def test_timestep_embedding_is_cos_then_sin():
    emb = np.array(timestep_embedding(mx.array([0.5]), 8))
    freqs = np.exp(-math.log(10_000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[0], np.concatenate([np.cos(500 * freqs), np.sin(500 * freqs)]), atol=2e-5)


def test_rope_rotates_pairs_and_keeps_norm():
    ids = mx.array([[0, 3, 5], [0, 1, 2]])
    cos, sin = rope(ids, (4, 14, 14), 10_000)
    x = mx.random.normal((1, 1, 2, 32), key=mx.random.key(0))
    y = apply_rope(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(np.array(y), axis=-1), np.linalg.norm(np.array(x), axis=-1), rtol=1e-5)
    # zero position -> identity on the first (index) axis channels
    np.testing.assert_allclose(np.array(y)[..., :4], np.array(x)[..., :4], rtol=1e-6)


def _diffusers_model(guidance: bool):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(guidance_embeds=guidance, **TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def _ours_from(model) -> FluxTransformer:
    src = {k: mx.array(v.detach().numpy()) for k, v in model.state_dict().items()}
    weights = convert(src, {k: "<torch>" for k in src}, DIFFUSERS_TRANSFORMER)
    ours = FluxTransformer(FluxParams.from_shapes(shapes_of(weights)))
    ours.load_weights(list(weights.items()), strict=True)
    return ours


@pytest.mark.parametrize("variant,grid", [("schnell", (3, 5)), ("dev", (4, 2))])
def test_matches_diffusers_float32(variant, grid):
    torch = pytest.importorskip("torch")
    model = _diffusers_model(guidance=variant == "dev")
    ours = _ours_from(model)
    assert ours.params.guidance_embed == (variant == "dev")

    rng = np.random.default_rng(1)
    h, w = grid
    n, txt_len = h * w, 7
    img = rng.standard_normal((1, n, 64)).astype(np.float32)
    txt = rng.standard_normal((1, txt_len, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 64)).astype(np.float32)
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    img_ids = img_ids.reshape(n, 3)
    txt_ids = np.zeros((txt_len, 3), np.float32)
    t, g = np.array([0.75], np.float32), np.array([3.5], np.float32)

    with torch.no_grad():
        ref = model(
            hidden_states=torch.from_numpy(img), encoder_hidden_states=torch.from_numpy(txt),
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
            img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
            guidance=torch.from_numpy(g) if variant == "dev" else None, return_dict=False,
        )[0].numpy()
    out = ours(mx.array(img), mx.array(txt), mx.array(pooled), mx.array(t), mx.array(img_ids), mx.array(txt_ids),
               guidance=mx.array(g) if variant == "dev" else None)
    assert rel_err(np.array(out), ref) <= 1e-4


def test_full_size_matches_diffusers_names_and_shapes():
    """The default params give exactly diffusers' parameters (after mapping), without allocating."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    ours = dict((k, v.shape) for k, v in tree_flatten(FluxTransformer(FluxParams(guidance_embed=True)).parameters()))

    grouped: dict[str, list[tuple[int, tuple]]] = {}
    for name, p in ref.state_dict().items():
        module, param = split_param(name)
        r = resolve(DIFFUSERS_TRANSFORMER, module)
        assert r is not None, f"no rule for diffusers {name}"
        grouped.setdefault(f"{r.target}.{param}", []).append((r.part, tuple(p.shape)))
    assert set(grouped) == set(ours)
    for name, parts in grouped.items():
        shapes = [s for _, s in sorted(parts)]
        fused = (sum(s[0] for s in shapes), *shapes[0][1:])
        assert tuple(ours[name]) == fused, name
    total = sum(math.prod(s) for s in ours.values())
    assert total == sum(p.numel() for p in ref.parameters())
    assert round(total / 1e9, 1) == 11.9


def test_params_from_pruned_shapes():
    p = FluxParams(hidden_size=64, num_heads=2, mlp_hidden=256, depth=1, depth_single=3, context_dim=32, vec_dim=64)
    shapes = {k: v.shape for k, v in tree_flatten(FluxTransformer(p).parameters())}
    assert FluxParams.from_shapes(shapes) == p
