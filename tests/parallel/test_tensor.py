"""Tensor-parallel generation over 2 local ranks (mlx.launch, ring backend) against one process, on the wide
tiny model: the same image (float32; within 1/255, as the sums of the two halves of each sharded matmul
are added in another order than one matmul adds them), half the transformer's memory per rank, and
the all-reduced bytes the shapes predict."""

from __future__ import annotations

import json

import pytest

from flux_1.models.transformer import FluxParams
from flux_1.parallel.tensor import all_reduce_bytes
from tests.parallel.launching import REPO, launch
from tests.parallel.wide import WIDE

SIZE, STEPS, TEXT_TOKENS = 32, 2, 256  # schnell's T5 length
CASES = ("plain", "q4-lora")  # without and with -q 4 and a LoRA (all its layers sharded)


@pytest.fixture(scope="module")
def results(tmp_path_factory, wide_flux, wide_lora):
    out = tmp_path_factory.mktemp("tensor") / "results.json"
    run = launch(str(REPO / "tests/parallel/launched_tensor.py"), str(wide_flux), str(out), "--lora", str(wide_lora),
                 "--size", str(SIZE), "--steps", str(STEPS), "--cases", *CASES)
    assert run.returncode == 0 and out.exists(), run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_image_equals_one_process(results, case):
    r = results[case]
    assert "error" not in r, r["error"]
    assert r["std"] > 5  # a real image, not a flat one that any split would reproduce
    assert r["max_diff"] <= 1, r


def test_each_rank_holds_about_half_the_transformer(results):
    for case in CASES:
        if "error" in results[case]:
            continue  # reported by the image test
        single, sharded = results[case]["single"], results[case]["sharded"]
        # Embedders and the final layer are replicated (~7% of this model, ~0.3% of FLUX.1).
        assert sharded["active"] < 0.6 * single["active"], (case, single, sharded)
    # Loading reads each rank's rows / columns straight from the file: the peak is the share plus one layer.
    assert results["plain"]["sharded"]["peak"] < 0.6 * results["plain"]["single"]["peak"]


def test_measured_all_reduce_bytes_match_the_shapes(results):
    h = WIDE["FLUX_HIDDEN"]
    params = FluxParams(hidden_size=h, num_heads=WIDE["FLUX_HEADS"], mlp_hidden=WIDE["FLUX_MLP"],
                        depth=WIDE["FLUX_DOUBLE"], depth_single=WIDE["FLUX_SINGLE"])
    expected = all_reduce_bytes(params, (SIZE // 16) ** 2, TEXT_TOKENS, itemsize=4)
    sharded = results["plain"]["sharded"]
    assert sharded["all_sums"] == STEPS * expected["calls"]
    assert sharded["bytes_summed"] == STEPS * expected["total"]
