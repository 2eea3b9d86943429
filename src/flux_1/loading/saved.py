"""Folders written by save.py (see flux_1.cli.save): our names, self-describing quantization."""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"


def is_saved_folder(root: Path) -> bool:
    return (Path(root) / MANIFEST).exists()


def load_component(root, component, dtype, spec):
    raise NotImplementedError("saved folders: see issue 4")
