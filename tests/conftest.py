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
