"""bench/sizes.py: the quantization size table from the real FLUX.1 shapes (nothing allocated)."""

import mlx.core as mx
import pytest

from bench import sizes
from flux_1 import quantization as q


def test_size_table_matches_hand_computation():
    before = mx.get_active_memory()
    table = sizes.size_table(settings=("bf16", "4", "mxfp4"))
    assert mx.get_active_memory() - before < 16 * 2**20  # shapes only: ~12B parameters never allocated

    # One layer by hand: the first double block's image MLP up-projection, 3072 -> 12288, with bias.
    out_f, in_f = 12288, 3072
    bf16 = out_f * in_f * 2 + out_f * 2
    affine4 = out_f * in_f * 4 // 8 + 2 * (out_f * in_f // 64) * 2 + out_f * 2  # codes, scales + biases, bias
    mxfp4 = out_f * in_f * 4 // 8 + (out_f * in_f // 32) * 1 + out_f * 2  # codes, e8m0 scales, bias
    for setting, expected in (("bf16", bf16), ("4", affine4), ("mxfp4", mxfp4)):
        model = sizes.full_size_model("transformer")
        model.set_dtype(mx.bfloat16)
        spec = None if setting == "bf16" else q.parse(setting)
        q.quantize_skeleton(model, q.layer_plan(model, "transformer", spec))
        layer = dict(model.named_modules())["double_blocks.0.img_mlp.layers.0"]
        assert q.parameter_bytes(layer) == expected, setting

    # The whole table against parameter counts: bf16 is 2 bytes a parameter.
    counts = {"transformer": 11_891_178_560, "t5": 4_762_310_656, "clip": 123_060_480, "vae": 83_819_683}
    for component, n in counts.items():
        assert table[component]["bf16"] == 2 * n, component
    assert table["pipeline"]["bf16"] == 2 * sum(counts.values())
    # mflux's published whole-pipeline figures (GB): same policy family, within 0.5%.
    for setting in ("bf16", "4"):
        assert table["pipeline"][setting] / 1e9 == pytest.approx(sizes.MFLUX_SIZES_GB[setting], rel=5e-3)
    assert table["vae"]["4"] == table["vae"]["bf16"]  # never quantized
    assert "| **whole pipeline** |" in sizes.format_size_table(table)

