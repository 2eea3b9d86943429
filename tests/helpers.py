"""Small shared assertions for the test suite."""

import numpy as np


def rel_err(ours, ref) -> float:
    """Relative error ||ours - ref|| / ||ref|| in float64 (the parity metric of the issues)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def has_torch_references() -> bool:
    """True when torch, diffusers and transformers are importable (live parity tests run)."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True
