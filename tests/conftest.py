import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on a machine without an NVIDIA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
