"""VAE: parity with diffusers' AutoencoderKL (tiny random weights), shapes read back, full-size layout."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux_1.models.vae import AutoEncoder, VAEParams
from tests.helpers import rel_err

TINY = VAEParams(block_out_channels=(32, 32, 64, 64))


def _diffusers_config(p: VAEParams) -> dict:
    n = len(p.block_out_channels)
    return {
        "in_channels": p.in_channels,
        "out_channels": p.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": p.block_out_channels,
        "layers_per_block": p.layers_per_block,
        "latent_channels": p.latent_channels,
        "norm_num_groups": p.norm_groups,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "scaling_factor": p.scaling_factor,
        "shift_factor": p.shift_factor,
    }


def _to_ours(array: np.ndarray) -> np.ndarray:
    """Torch layout -> ours: 4-D conv weights (O, I, kH, kW) -> (O, kH, kW, I); names are unchanged."""
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def _shape_to_ours(shape: tuple) -> tuple:
    return tuple(shape[i] for i in (0, 2, 3, 1)) if len(shape) == 4 else tuple(shape)


def _shapes(model: AutoEncoder) -> dict[str, tuple]:
    # .shape only: the parameters are lazy and are never evaluated here.
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**_diffusers_config(TINY)).eval()
    with torch.no_grad():
        # Default init leaves norms at (1, 0) and many biases at 0: move everything so a mix-up shows.
        for name, param in vae.named_parameters():
            if "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model = AutoEncoder(TINY)
    weights = [(k, mx.array(_to_ours(v.numpy()))) for k, v in vae.state_dict().items()]
    model.load_weights(weights, strict=True)
    return torch, vae, model


def test_decode_matches_diffusers(reference):
    torch, vae, model = reference
    z = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample.permute(0, 2, 3, 1).numpy()  # raw decoder: diffusers does not scale here
    ours = model.decode(mx.array(z.permute(0, 2, 3, 1).numpy()))
    assert ours.shape == (1, 48, 80, 3)
    assert rel_err(ours, ref) <= 1e-4


def test_encode_matches_diffusers(reference):
    torch, vae, model = reference
    x = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mean, logvar = model.encode(mx.array(x.permute(0, 2, 3, 1).numpy()))
    assert mean.shape == logvar.shape == (1, 6, 10, 16)
    assert rel_err(mean, dist.mean.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert rel_err(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()) <= 1e-4


def test_scale_unscale_round_trip():
    model = AutoEncoder(TINY)
    z = mx.array(np.random.default_rng(0).standard_normal((1, 4, 4, 16)).astype(np.float32))
    assert np.allclose(model.scale_latents(z), (np.array(z) - 0.1159) * 0.3611, atol=1e-6)
    assert np.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        VAEParams(),
        TINY,
        VAEParams(block_out_channels=(32, 64, 64), layers_per_block=1),
        VAEParams(in_channels=4, out_channels=1, latent_channels=8, block_out_channels=(32,)),
    ],
)
def test_from_shapes_round_trip(params):
    shapes = _shapes(AutoEncoder(params))
    assert VAEParams.from_shapes(shapes) == params


def test_pruned_config_builds_right_model():
    p = VAEParams(block_out_channels=(32, 64, 64), layers_per_block=1)
    model = AutoEncoder(VAEParams.from_shapes(_shapes(AutoEncoder(p))))
    assert len(model.encoder.down_blocks) == 3 and len(model.decoder.up_blocks) == 3
    assert all(len(b.resnets) == 1 for b in model.encoder.down_blocks)
    assert all(len(b.resnets) == 2 for b in model.decoder.up_blocks)
    assert "downsamplers" not in model.encoder.down_blocks[-1]
    assert "upsamplers" not in model.decoder.up_blocks[-1]
    image = model.decode(mx.zeros((1, 3, 5, 16)))
    assert image.shape == (1, 12, 20, 3)  # two upsamplers: 4x
    mean, logvar = model.encode(mx.zeros((1, 12, 20, 3)))
    assert mean.shape == logvar.shape == (1, 3, 5, 16)


def test_full_size_layout_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**_diffusers_config(VAEParams()))
    ref = {k: _shape_to_ours(tuple(v.shape)) for k, v in vae.state_dict().items()}
    ours = _shapes(AutoEncoder(VAEParams()))
    assert sorted(ours) == sorted(ref)
    assert ours == ref
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in vae.parameters())
    assert 83.7e6 < count < 83.9e6


def test_conv3x3_strips_are_exact_and_bound_memory(monkeypatch):
    """Row strips with a one-row halo give the plain conv's output, bit for bit, with a smaller peak."""
    from flux_1.models import vae

    conv = vae.Conv3x3(64, 32)
    x = mx.random.normal((1, 96, 80, 64), key=mx.random.key(3))
    mx.eval(conv.parameters(), x)
    plain = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    mx.eval(plain)
    mx.reset_peak_memory()
    whole = conv(x)  # under STRIP_BYTES: one piece
    mx.eval(whole)
    peak_whole = mx.get_peak_memory()
    monkeypatch.setattr(vae, "STRIP_BYTES", 9 * 80 * 64 * 4 * 7)  # 7-row strips: 14 of them, a ragged last one
    mx.reset_peak_memory()
    strips = conv(x)
    mx.eval(strips)
    assert mx.array_equal(whole, plain)
    # Each strip is a smaller GEMM: an optimised BLAS (OpenBLAS) blocks it differently, so the sums may
    # round differently in the last bit; with MLX's bundled BLAS the strips are bit-identical.
    assert mx.allclose(strips, plain, rtol=1e-5, atol=1e-5)
    assert mx.get_peak_memory() < peak_whole
