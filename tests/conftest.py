import pytest
import torch

from udi_kernels.testing.poison import poison_empty  # noqa: F401  (the fixture, for every test module)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; scripts/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
