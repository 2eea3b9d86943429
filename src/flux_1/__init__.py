"""FLUX.1 in MLX."""

# Before anything imports mlx: on Linux's CPU backend this loads an OpenBLAS for MLX's matrix products
# (see backend.py; FLUX1_BLAS=off keeps MLX's bundled BLAS). Every entry point imports this package first.
from .backend import release_memory, select_blas, tune_malloc

select_blas()
tune_malloc()  # glibc keeps the memory MLX frees for its next buffers (backend.py; FLUX1_MALLOC=off)

from .pipeline.flux1 import Config, Flux1, GeneratedImage  # noqa: E402  (after select_blas: it imports mlx)

__all__ = ["Config", "Flux1", "GeneratedImage", "release_memory"]
__version__ = "0.1.0"
