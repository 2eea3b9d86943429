"""Speed and memory benchmarks for flux_1, side by side with diffusers (see BENCHMARKS.md).

`python -m bench --config tiny|mid|full ...` (or `python bench/run.py ...`): random weights at the
configuration's shapes are written to a safetensors folder in the diffusers layout, then every stage is
timed through the real code paths: the loader (`flux_1.loading.folder`), the text encoders, the
transformer steps, the VAE decode. The same folder is then run through diffusers / transformers in a
subprocess (torch) for the ratios.

The diffusers subprocess (`python -m bench.reference`, started with FLUX1_BENCH_REFERENCE=1) does not
import flux_1: its `__init__` loads an OpenBLAS with RTLD_GLOBAL for MLX, which would also take over
torch's `sgemm_` (torch's own is MKL, statically in libtorch_cpu.so).
"""

import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("flux_1") is None:  # a plain checkout (no pip install -e .)
    sys.path.insert(0, str(_ROOT / "src"))
if not os.environ.get("FLUX1_BENCH_REFERENCE"):
    import flux_1  # noqa: F401  (loads the optimised BLAS before anything imports mlx)
