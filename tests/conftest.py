"""Shared test harness: per-test reset of global state and seeds (as Pyro's conftest does)."""

from pathlib import Path

import pyro
import pytest
import torch

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _reset_global_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of small tensors: threads buy nothing there, and on a
    shared 2-core machine a busy neighbour process makes OpenMP's waiting threads slow
    training ~20x. Restores the previous setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
