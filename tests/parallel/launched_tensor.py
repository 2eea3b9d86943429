"""Run under `mlx.launch -n 2 --backend ring`: for each case, the ranks generate one image with their
tensor-parallel shares of the transformer, then rank 0 alone the same image with the whole transformer;
the transformer's memory is measured both ways. Rank 0 writes what it saw as JSON, {case: results}
(tests/parallel/test_tensor.py).

usage: launched_tensor.py MODEL_FOLDER OUT_JSON [--lora FILE] [--cases plain q4 lora q4-lora]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

import flux_1  # noqa: E402,F401  (its BLAS before mlx)
from flux_1.parallel import world  # noqa: E402
from flux_1.pipeline.flux1 import Config, Flux1  # noqa: E402


def run(args, case: str, group) -> tuple[np.ndarray, dict]:
    import mlx.core as mx

    quantize = 4 if "q4" in case else None
    loras = [str(args.lora)] if "lora" in case else None
    flux = Flux1.from_alias(args.model, path=args.folder, quantize=quantize, precision="float32",
                            lora_paths=loras, progress=False, group=group)
    config = Config(num_inference_steps=args.steps, height=args.size, width=args.size)
    flux.encode_prompt("a red fox")
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    flux.transformer  # noqa: B018  (loads it, LoRAs applied)
    mx.clear_cache()
    memory = {"active": mx.get_active_memory() - before, "peak": mx.get_peak_memory() - before}
    image = flux.generate_image(seed=3, prompt="a red fox", config=config, progress=False)
    if flux.reducer is not None:
        memory["all_sums"], memory["bytes_summed"] = flux.reducer.calls, flux.reducer.bytes
    return np.asarray(image.image), memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="schnell")
    p.add_argument("--lora", type=Path)
    p.add_argument("--cases", nargs="+", default=["plain"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    group = world()
    assert group is not None and group.size() == 2, "launch with mlx.launch -n 2"
    results = {}
    for case in args.cases:
        try:  # a case that fails (the same way on both ranks) is reported, the others still run
            sharded, sharded_memory = run(args, case, group)
            if group.rank() != 0:
                continue
            single, single_memory = run(args, case, None)  # rank 0 alone: the reference
        except Exception as e:  # noqa: BLE001
            results[case] = {"error": f"{type(e).__name__}: {e}"}
            continue
        diff = np.abs(single.astype(int) - sharded.astype(int))
        results[case] = {"max_diff": int(diff.max()), "equal": bool((diff == 0).all()), "std": float(single.std()),
                         "single": single_memory, "sharded": sharded_memory}
    if group.rank() == 0:
        args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
