"""The wide tiny model (tests/parallel/wide.py) and its LoRA, written once per session."""

from __future__ import annotations

import pytest

from tests.parallel.wide import write_lora, write_wide_flux


@pytest.fixture(scope="session")
def wide_flux(tmp_path_factory, tiny_flux):
    root = tmp_path_factory.mktemp("wide")
    return write_wide_flux(root / "FLUX.1-schnell-wide", tiny_flux("schnell", "float32", bfl=False))


@pytest.fixture(scope="session")
def wide_lora(tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("wide-lora") / "wide_lora.safetensors")
