"""Uninitialised memory filled with NaN (floats) / the largest value (ints), so that an output element a kernel
forgets to write shows up in the comparison."""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty (also at::empty in the extension) returns NaN / INT_MAX-filled memory inside the block:
    deterministic mode (warn_only) with fill_uninitialized_memory; both settings restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def poison_empty():
    """pytest fixture form of poisoned_empty (tests/conftest.py imports it)."""
    with poisoned_empty():
        yield


def poison_cuda_allocator():
    """Fill freed cached CUDA blocks with NaN: an output element a kernel never writes then shows up."""
    torch.empty(64 << 20, device="cuda").fill_(float("nan"))
