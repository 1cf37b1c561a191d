"""Fixtures shared by the unit tests (the repo-root conftest.py sets quick mode)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread, then restore the thread count.

    The models in unit tests are tiny: a second OpenMP thread only adds synchronisation, and
    on a shared 2-core machine a waiting thread made such tests up to ~10x slower. Use it
    module-wide with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
