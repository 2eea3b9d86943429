"""Speed and memory benchmarks for flux_1, side by side with diffusers (see BENCHMARKS.md).

`python -m bench --config tiny|mid|full ...` (or `python bench/run.py ...`): random weights at the
configuration's shapes are written to a safetensors folder in the diffusers layout, then every stage is
timed through the real code paths: the loader (`flux_1.loading.folder`), the text encoders, the
transformer steps, the VAE decode. The same folder is then run through diffusers / transformers in a
subprocess (torch) for the ratios.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
try:  # an installed flux_1 (pip install -e .) wins; a plain checkout works too
    import flux_1  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the repo was set up
    sys.path.insert(0, str(_ROOT / "src"))
    import flux_1  # noqa: F401  (loads the optimised BLAS before anything imports mlx)
