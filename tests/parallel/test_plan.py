"""The shard plan, slicing and group helpers, in one process (nothing is launched)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flux_1 import parallel
from flux_1.models.transformer import FluxParams, FluxTransformer
from flux_1.parallel import ParallelError, data, tensor

PARAMS = FluxParams(in_channels=64, context_dim=32, vec_dim=64, hidden_size=128, num_heads=4, mlp_hidden=512,
                    depth=1, depth_single=1)


def test_plain_run_never_initialises_the_engine(monkeypatch):
    for name in parallel.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("mx.distributed.init called in a plain run")

    monkeypatch.setattr(mx.distributed, "init", refuse)
    assert not parallel.launched()
    assert parallel.world() is None
    assert parallel.is_main(None)


def test_plan_covers_the_sharded_linears_with_their_segments():
    plan = tensor.shard_plan(PARAMS)
    D, M = 128, 512
    assert plan["double_blocks.0.img_attn.qkv"] == tensor.Split(tensor.ROWS, (D, D, D))
    assert plan["double_blocks.0.txt_mlp.layers.2"] == tensor.Split(tensor.COLS, (M,))
    assert plan["single_blocks.0.linear1"] == tensor.Split(tensor.ROWS, (D, D, D, M))
    assert plan["single_blocks.0.linear2"] == tensor.Split(tensor.COLS, (D, M))
    assert plan["double_blocks.0.img_mod.lin"].kind == tensor.COLS
    modules = dict(FluxTransformer(PARAMS).named_modules())
    assert all(name in modules for name in plan)
    assert not any(name.startswith(("img_in", "txt_in", "final_layer", "time_in")) for name in plan)


def test_segments_split_per_part_so_each_rank_keeps_whole_heads():
    # q | k | v of 8 rows each over 2 ranks: rank 1 takes rows 4-7 of each part.
    assert tensor.segment_ranges((8, 8, 8), 1, 2) == [(4, 8), (12, 16), (20, 24)]
    w = mx.arange(24 * 3).reshape(24, 3)
    part = tensor.shard_tensor("weight", w, tensor.Split(tensor.ROWS, (8, 8, 8)), 1, 2)
    np.testing.assert_array_equal(np.array(part)[:, 0], np.r_[4:8, 12:16, 20:24] * 3)


def test_sharded_to_all_splits_columns_and_rank_0_keeps_the_bias():
    split = tensor.Split(tensor.COLS, (4, 8))
    w = mx.arange(2 * 12).reshape(2, 12)
    np.testing.assert_array_equal(np.array(tensor.shard_tensor("weight", w, split, 1, 2))[0], [2, 3, 8, 9, 10, 11])
    bias = mx.array([1.0, 2.0])
    assert tensor.shard_tensor("bias", bias, split, 0, 2).tolist() == [1.0, 2.0]
    assert tensor.shard_tensor("bias", bias, split, 1, 2).tolist() == [0.0, 0.0]


def test_quantized_columns_are_sliced_on_whole_groups():
    w = mx.random.normal((8, 256))
    codes, scales, biases = mx.quantize(w, group_size=64, bits=4)
    split, how = tensor.Split(tensor.COLS, (256,)), {"bits": 4, "group_size": 64}
    parts = [tensor.shard_tensor(p, v, split, 1, 2, how) for p, v in
             (("weight", codes), ("scales", scales), ("biases", biases))]
    np.testing.assert_array_equal(np.array(mx.dequantize(*parts, group_size=64, bits=4)),
                                  np.array(mx.dequantize(codes, scales, biases, group_size=64, bits=4))[:, 128:])


def test_slices_own_their_memory():
    mx.clear_cache()
    before = mx.get_active_memory()
    w = mx.zeros((1024, 1024))
    mx.eval(w)
    part = tensor.take(w, [(0, 512)], 0)
    mx.eval(part)
    del w
    mx.clear_cache()
    assert mx.get_active_memory() - before == 512 * 1024 * 4  # the source is gone: the slice is a copy


def test_uneven_splits_are_refused_with_the_reason():
    with pytest.raises(ParallelError, match="4 attention heads do not split over 3 ranks"):
        tensor.check_split(PARAMS, 3)
    plan = tensor.shard_plan(PARAMS)
    with pytest.raises(ParallelError, match=r"single_blocks.0.linear2: its quantization group size 128 does not "
                                            r"divide a rank's 64 input columns"):
        tensor.check_groups({"single_blocks.0.linear2": {"group_size": 128, "bits": 4}}, plan, 2)


def test_all_reduce_bytes_of_flux1_at_1024():
    # 4096 image + 512 text tokens, bf16: 19 x 2 + 38 = 76 sums of (4608 x 3072) values per step.
    b = tensor.all_reduce_bytes(FluxParams(), 4096, 512)
    assert b["activations"] == 76 * 4608 * 3072 * 2
    assert b["calls"] == 19 * 6 + 38 * 2


def test_seeds_are_dealt_round_robin():
    assert data.my_seeds([1, 2, 3, 4, 5], 0, 2) == [1, 3, 5]
    assert data.my_seeds([1, 2, 3, 4, 5], 1, 2) == [2, 4]
    assert data.my_seeds([7], 1, 2) == []


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_each_rank_reads_its_share_straight_from_the_files(tmp_path, tiny_flux, layout):
    """The rows / columns read from disk are those the lazy load-then-slice path keeps."""
    import shutil

    from flux_1.loading import folder
    from flux_1.loading.weights import shapes_of

    root = tmp_path / "model"
    shutil.copytree(tiny_flux("dev", "bfloat16", bfl=True), root)
    if layout == "bfl":
        shutil.rmtree(root / "transformer")
    full = folder.find_source(root, "transformer").weights
    params = FluxParams.from_shapes(shapes_of(full))
    plan = tensor.shard_plan(params)
    for rank in (0, 1):
        readers = tensor.slice_readers(root, plan, rank, 2)
        assert set(readers) == {f"{m}.weight" for m in plan}
        for key, read in readers.items():
            expected = tensor.shard_tensor("weight", full[key], plan[key.rpartition(".")[0]], rank, 2)
            got = read()
            assert got.dtype == mx.bfloat16 and got.shape == expected.shape, key
            assert mx.array_equal(got, expected).item(), key
