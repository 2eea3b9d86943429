import pytest

from flux_1.pipeline import flux1


@pytest.fixture
def count_loads(monkeypatch):
    """A list that gets one entry per Flux1 construction (model load)."""
    loads = []
    original = flux1.Flux1.__init__

    def counting(self, *args, **kwargs):
        loads.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(flux1.Flux1, "__init__", counting)
    return loads
