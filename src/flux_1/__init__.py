"""FLUX.1 in MLX."""

from .pipeline.flux1 import Config, Flux1, GeneratedImage

__all__ = ["Config", "Flux1", "GeneratedImage"]
__version__ = "0.1.0"
