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


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: bad input must be refused before loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(flux1.Flux1, "__init__", refuse)
