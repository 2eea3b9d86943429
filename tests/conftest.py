"""Shared pytest fixtures: tiny FLUX.1 checkpoints and the committed reference outputs.

- ``tiny_schnell`` / ``tiny_dev``: session-wide folders in the FLUX.1-{schnell,dev} diffusers layout plus the
  BFL single files (float32, seed 0), written by ``tests/fixtures/make_tiny_checkpoints.py``. They hold the
  very weights the reference outputs were computed from.
- ``tiny_flux``: factory ``tiny_flux(variant="schnell", dtype="float32", bfl=True, seed=0) -> Path`` for other
  stored dtypes (cached per session; do not modify the folders it returns).
- ``reference``: ``tests/reference/reference_outputs.npz`` as a ``dict[str, np.ndarray]`` (keys are listed in
  ``tests/reference/make_reference_outputs.py``).

``tests.helpers`` (``rel_err``, ``has_torch_references``) and the ``flux_1`` package under ``src/`` are
importable from every test. torch is never imported here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "src", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import flux_1  # noqa: E402,F401  (first, before any test imports mlx: one BLAS for the whole run)
from tests.fixtures.make_tiny_checkpoints import write_tiny_flux  # noqa: E402
from tests.helpers import has_torch_references, rel_err  # noqa: E402,F401

REFERENCE_NPZ = REPO / "tests" / "reference" / "reference_outputs.npz"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """Factory writing (once per session and argument set) a tiny FLUX.1 repository; returns its folder."""
    cache: dict[tuple, Path] = {}

    def make(variant: str = "schnell", dtype: str = "float32", bfl: bool = True, seed: int = 0) -> Path:
        key = (variant, dtype, bool(bfl), int(seed))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"FLUX.1-{variant}-{dtype}-seed{seed}{'-bfl' if bfl else ''}")
            cache[key] = write_tiny_flux(folder, variant, dtype, seed=seed, bfl=bfl)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_schnell(tiny_flux) -> Path:
    """Tiny FLUX.1-schnell: diffusers layout + flux1-schnell.safetensors + ae.safetensors, float32."""
    return tiny_flux("schnell", "float32", bfl=True)


@pytest.fixture(scope="session")
def tiny_dev(tiny_flux) -> Path:
    """Tiny FLUX.1-dev: diffusers layout + flux1-dev.safetensors + ae.safetensors, float32."""
    return tiny_flux("dev", "float32", bfl=True)


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    """The committed reference outputs (diffusers / transformers on the tiny fixtures)."""
    if not REFERENCE_NPZ.exists():
        pytest.fail(f"{REFERENCE_NPZ} is missing: run python tests/reference/make_reference_outputs.py")
    with np.load(REFERENCE_NPZ) as data:
        return {k: data[k] for k in data.files}
