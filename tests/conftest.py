"""Fixtures shared by every test folder."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests, restored afterwards. The tiny models' ops are far
    too small to gain from threads (``o2mag generate`` runs them on one for that reason), and on a
    machine whose cores are shared, OpenMP's barriers between two threads can stall a call many
    times over. Timings are never asserted; the runs should just be short. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as a module fixture's argument."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
