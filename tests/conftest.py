import pytest
import torch

import eefast  # noqa: F401  (loads torch.ops.eefast)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every op test runs on CPU, and again on CUDA wherever a GPU is present."""
    return torch.device(request.param)


@pytest.fixture
def finished_caches(monkeypatch):
    """A list that gets, each time a sequence finishes (its batch row is selected away), the
    cache as it was then: (valid slots of row 0, per-layer lengths, keys, values)."""
    from eefast.generation.cache import DecodeState

    snapshots = []
    real_select = DecodeState.select

    def select(self, rows):
        c = self.cache
        snapshots.append((self.valid[0].clone(), list(c.lengths), c.keys[:], c.values[:]))
        real_select(self, rows)

    monkeypatch.setattr(DecodeState, "select", select)
    return snapshots
