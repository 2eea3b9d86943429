"""VAE: parity with diffusers' AutoencoderKL (tiny random weights), shapes read back, full-size layout."""

import mlx.core as mx
import mlx.nn as nn
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
    """Row strips with a one-row halo give the plain conv's output with a bounded working set; neither path
    builds MLX's 9x im2col buffer."""
    from flux_1.models import vae

    monkeypatch.setattr(vae.Conv3x3, "_winograd", lambda self, x: False)  # the offset-GEMM path (see below)
    conv = vae.Conv3x3(64, 32)
    x = mx.random.normal((1, 96, 80, 64), key=mx.random.key(3))
    mx.eval(conv.parameters(), x)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    plain = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    mx.eval(plain)
    im2col_peak = mx.get_peak_memory() - base
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    whole = conv(x)  # under STRIP_BYTES: one piece
    mx.eval(whole)
    whole_peak = mx.get_peak_memory() - base
    monkeypatch.setattr(vae, "STRIP_BYTES", 9 * 80 * 64 * 4 * 7)  # 7-row strips: 14 of them, a ragged last one
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    strips = conv(x)
    mx.eval(strips)
    strips_peak = mx.get_peak_memory() - base
    # 9 accumulated GEMMs (ours) and MLX's im2col GEMM add the same products in another order, and each
    # strip is a smaller GEMM that a BLAS may block differently: equal within float32 rounding.
    assert mx.allclose(whole, plain, rtol=1e-5, atol=1e-5)
    assert mx.allclose(strips, plain, rtol=1e-5, atol=1e-5)
    assert im2col_peak > 9 * x.nbytes  # what MLX's conv takes: the 9x buffer
    assert whole_peak < 4 * x.nbytes  # a padded copy and output-sized accumulators only
    one_strip = 9 * 82 * 64 * 4 + 3 * 7 * 82 * 32 * 4  # a padded 7-row strip, its accumulators
    assert strips_peak <= 2 * plain.nbytes + one_strip  # the strips and their concatenation, one working set


@pytest.mark.parametrize("batch,height,width,cin,cout", [
    (1, 8, 6, 16, 24),
    (2, 4, 10, 8, 8),  # batched
    (1, 2, 2, 4, 4),  # one tile
    (1, 6, 12, 32, 9),
])
def test_conv3x3_winograd_matches_mlx_conv(batch, height, width, cin, cout):
    """Winograd F(2x2, 3x3) computes the 3x3 conv (with and without bias and spare row) within float32
    rounding of a few more additions."""
    from flux_1.models.vae import conv3x3_winograd, winograd_weight

    x = mx.random.normal((batch, height, width, cin), key=mx.random.key(height))
    weight = mx.random.normal((cout, 3, 3, cin), key=mx.random.key(width)) / (9 * cin) ** 0.5
    bias = mx.random.normal((cout,), key=mx.random.key(cin))
    want = mx.conv2d(x, weight, padding=1)
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    u = winograd_weight(weight)
    np.testing.assert_allclose(np.array(conv3x3_winograd(padded, u)), np.array(want), rtol=1e-5, atol=1e-5)
    spare = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)])
    got = conv3x3_winograd(spare, u, bias, spare_row=True)
    np.testing.assert_allclose(np.array(got), np.array(want + bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,height,width,channels,out_channels",
                         [(1, 5, 7, 16, 24), (2, 3, 4, 8, 8), (1, 1, 1, 4, 4)])
def test_upsample_winograd_matches_conv_of_upsample(batch, height, width, channels, out_channels):
    """conv3x3(nearest 2x of x) by Winograd on the low-resolution input, with and without bias and spare row."""
    from flux_1.models import vae

    x = mx.random.normal((batch, height, width, channels), key=mx.random.key(height))
    weight = mx.random.normal((out_channels, 3, 3, channels), key=mx.random.key(width)) / (9 * channels) ** 0.5
    bias = mx.random.normal((out_channels,), key=mx.random.key(channels))
    want = mx.conv2d(vae.upsample_nearest2x(x), weight, padding=1)
    u = vae.upsample_winograd_weight(weight)
    plain = vae.upsample2x_conv3x3_winograd(mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), u)
    np.testing.assert_allclose(np.array(plain), np.array(want), rtol=1e-5, atol=1e-5)
    spare = vae.upsample2x_conv3x3_winograd(mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]), u, bias, spare_row=True)
    np.testing.assert_allclose(np.array(spare), np.array(want + bias), rtol=1e-5, atol=1e-5)


def test_conv3x3_winograd_strips_are_exact_and_bound_memory(monkeypatch):
    """The module runs Winograd on the CPU in float32 at even sizes, in strips of about WINOGRAD_STRIP_BYTES of
    input whose working set (4x input, 4x output in transforms) does not grow with the image; it falls back
    to the offset GEMMs for odd sizes, bfloat16 and a narrow output."""
    from flux_1.models import vae

    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU path only")
    conv = vae.Conv3x3(64, 32)
    x = mx.random.normal((1, 96, 80, 64), key=mx.random.key(3))
    mx.eval(conv.parameters(), x)
    assert conv._winograd(x)
    assert not conv._winograd(x[:, :95]) and not conv._winograd(x[:, :, :79])
    assert not conv._winograd(x.astype(mx.bfloat16))
    assert not vae.Conv3x3(64, 16)._winograd(x)  # 4 * 16 <= 64: conv3x3_valid's one-GEMM path
    want = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    mx.eval(want)
    strip_rows = 8
    monkeypatch.setattr(vae, "WINOGRAD_STRIP_BYTES", strip_rows * 82 * 64 * 4)  # 12 strips of 8 rows
    strips, strips_peak = _least_peak(lambda: conv(x))
    np.testing.assert_allclose(np.array(strips), np.array(want), rtol=1e-5, atol=1e-5)
    odd = x[:, :95]
    np.testing.assert_allclose(np.array(conv(odd)), np.array(mx.conv2d(odd, conv.weight, padding=1) + conv.bias),
                               rtol=1e-5, atol=1e-5)
    # One strip: its padded input, the column pass (2x), V (4x), M and the tile outputs (4x + 1x the strip's
    # output), the interleaved output; beside the strips and their concatenation.
    strip_in, strip_out = (strip_rows + 3) * 82 * 64 * 4, strip_rows * 80 * 32 * 4
    assert strips_peak <= 2 * want.nbytes + 8 * strip_in + 7 * strip_out
    monkeypatch.setattr(vae, "WINOGRAD_STRIP_BYTES", 2 * strip_rows * 82 * 64 * 4)
    _, twice = _least_peak(lambda: conv(x))
    assert strips_peak < twice  # smaller strips, smaller working set


@pytest.mark.parametrize("batch,height,width,cin,cout", [
    (1, 9, 7, 16, 8),  # the offset-GEMM path
    (2, 5, 6, 8, 16),  # batched, widening
    (1, 8, 8, 64, 3),  # output much narrower than the input: one GEMM to 9 taps, shifted sums
    (2, 4, 5, 32, 4),
])
def test_conv3x3_valid_matches_mlx_conv(batch, height, width, cin, cout):
    from flux_1.models import vae

    x = mx.random.normal((batch, height + 2, width + 2, cin), key=mx.random.key(7))
    w = mx.random.normal((cout, 3, 3, cin), key=mx.random.key(8))
    b = mx.random.normal((cout,), key=mx.random.key(9))
    reference = np.array(mx.conv2d(x, w))
    ours = vae.conv3x3_valid(x, w)
    assert ours.shape == (batch, height, width, cout)
    np.testing.assert_allclose(np.array(ours), reference, rtol=1e-5, atol=2e-5 * cin**0.5)
    # A spare zero row below (as Conv3x3 pads its strips) and the bias in the first GEMM: the same conv.
    spare = mx.pad(x, [(0, 0), (0, 1), (0, 0), (0, 0)])
    ours = vae.conv3x3_valid(spare, w, b, spare_row=True)
    assert ours.shape == (batch, height, width, cout)
    np.testing.assert_allclose(np.array(ours), reference + np.array(b), rtol=1e-5, atol=2e-5 * cin**0.5)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_torch_semantics(silu):
    """Our GroupNorm (per-channel sums, then per group; optionally SiLU in the same pass) against a float64
    torch-style GroupNorm: statistics per (image, group) over all pixels."""
    from flux_1.models import vae

    norm = vae.GroupNorm(4, 16, 1e-6)
    norm.update({"weight": mx.random.normal((16,), key=mx.random.key(1)),
                 "bias": mx.random.normal((16,), key=mx.random.key(2))})
    x = mx.random.normal((2, 6, 5, 16), key=mx.random.key(3)) * 3 + 5  # a mean far from 0: no cancellation
    ours = np.array(norm(x, silu=silu))
    xs = np.array(x).astype(np.float64).reshape(2, 30, 4, 4)
    mean, var = xs.mean(axis=(1, 3), keepdims=True), xs.var(axis=(1, 3), keepdims=True)
    want = ((xs - mean) / np.sqrt(var + 1e-6)).reshape(2, 6, 5, 16) * np.array(norm.weight) + np.array(norm.bias)
    if silu:
        want = want / (1 + np.exp(-want))
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    assert mx.allclose(norm(x), nn.GroupNorm(4, 16, eps=1e-6, pytorch_compatible=True).update(norm.parameters())(x),
                       atol=1e-4)


@pytest.mark.parametrize("batch,height,width,channels,out_channels", [
    (1, 5, 7, 16, 16),  # odd sizes
    (2, 4, 3, 8, 12),  # batched, widening
    (1, 1, 1, 8, 8),  # one pixel: every tap but the centre reads the zero border
    (1, 6, 9, 32, 4),
])
def test_upsample_folded_into_conv_matches_conv_of_upsample(batch, height, width, channels, out_channels):
    """conv3x3(nearest 2x(x)) as 4 output phases of 2x2 convs on x: the same function as the upsample then the
    padded conv, borders included (zero padding of x is zero padding of the upsampled image)."""
    from flux_1.models import vae

    conv = vae.Conv3x3(channels, out_channels)
    x = mx.random.normal((batch, height, width, channels), key=mx.random.key(5))
    want = mx.conv2d(vae.upsample_nearest2x(x), conv.weight, padding=1) + conv.bias
    assert vae.upsample_nearest2x(x).shape == (batch, 2 * height, 2 * width, channels)
    ours = conv.upsampled(x)
    assert ours.shape == (batch, 2 * height, 2 * width, out_channels)
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-5, atol=2e-5 * channels**0.5)


def _least_peak(fn, repeats: int = 3) -> tuple[mx.array, int]:
    """fn()'s result and the least memory its evaluation added at its peak over a few runs (MLX frees
    buffers as its CPU stream finishes with them, so a single run's peak jitters by a buffer or two)."""
    peaks = []
    for _ in range(repeats):
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        out = fn()
        mx.eval(out)
        peaks.append(mx.get_peak_memory() - base)
    return out, min(peaks)


@pytest.mark.parametrize("path", ["winograd", "folded"])
def test_upsample_folded_strips_are_exact_and_bound_memory(monkeypatch, path):
    """The CPU upsampler (Winograd in float32, the folded taps otherwise) in row strips (a ragged last one,
    halos at every boundary) gives the unstripped output; neither makes the 4x upsampled copy of its input,
    and the strips hold one strip's working set (beside the output: at this size that is about the
    one-piece peak, 0.4-0.6 MB either way)."""
    from flux_1.models import vae

    monkeypatch.setattr(vae.Conv3x3, "_winograd_upsample", lambda self, x: path == "winograd")
    conv = vae.Conv3x3(32, 32)
    x = mx.random.normal((1, 23, 20, 32), key=mx.random.key(6))
    mx.eval(conv.parameters(), x)
    want = mx.conv2d(vae.upsample_nearest2x(x), conv.weight, padding=1) + conv.bias
    mx.eval(want)
    whole, whole_peak = _least_peak(lambda: conv.upsampled(x))  # under STRIP_BYTES: one piece
    monkeypatch.setattr(vae, "STRIP_BYTES", 9 * 40 * 32 * 4 * 10)  # 10 output rows: 5 input rows, 5 strips
    strips, strips_peak = _least_peak(lambda: conv.upsampled(x))
    np.testing.assert_allclose(np.array(whole), np.array(want), rtol=1e-5, atol=2e-5 * 32**0.5)
    np.testing.assert_allclose(np.array(strips), np.array(want), rtol=1e-5, atol=2e-5 * 32**0.5)
    # Folded: the 4 phases (output-sized together), the interleaved output and a padded copy of the (4x
    # smaller) input. The upsample-then-conv path needs the upsampled copy's padded version and the conv's
    # output (2.2x the output here, and the upsampled copy itself before the pad): since Conv3x3's strips
    # carry a spare row it is no larger than the folded path at peak; the fold's gain is 2.25x fewer FLOPs.
    # Winograd also holds the 9 transformed inputs and the 9 GEMM outputs, each a quarter of the output here:
    # at worst all of them, the 4 phases and the output at once, 2.25 + 2.25 + 1 + 1 plus the padded input
    # (4.5-5.6x measured, as MLX frees buffers asynchronously), for 16 / 9 fewer FLOPs again; the strips
    # bound both.
    assert whole_peak < (7.0 if path == "winograd" else 3.5) * want.nbytes
    one_strip = 2 * 7 * 22 * 32 * 4 + 2 * 10 * 40 * 32 * 4  # a padded 5-row input strip, its phases and output
    if path == "winograd":
        one_strip += (8 + 9) * 5 * 20 * 32 * 4  # the transformed inputs and the GEMM outputs
    assert strips_peak <= 2 * want.nbytes + one_strip  # the strips and their concatenation, one working set


def test_fold_upsample_weight_sums_the_taps():
    """Phase (s, t), tap (d, e) holds the sum of the 3x3 taps that land on the same low-resolution pixel."""
    from flux_1.models import vae

    w = mx.random.normal((3, 3, 3, 2), key=mx.random.key(9))  # (O, 3, 3, C)
    folded = np.array(vae.fold_upsample_weight(w))  # (s, t, d, e, C, O)
    taps = np.array(w).transpose(1, 2, 3, 0)  # (3, 3, C, O)
    rows = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}  # phase -> tap rows read by its two input rows
    for s in range(2):
        for t in range(2):
            for d in range(2):
                for e in range(2):
                    want = sum(taps[i, j] for i in rows[s][d] for j in rows[t][e])
                    np.testing.assert_allclose(folded[s, t, d, e], want, rtol=1e-6, atol=1e-6)
