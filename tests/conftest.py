import sys
from pathlib import Path

# test helper modules (tests/core/helpers.py) import as plain modules
sys.path.insert(0, str(Path(__file__).parent / "core"))
# the guide's user-algorithm example (examples/mini_fedmd.py) is in the conformance suite
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and far faster on a busy machine
    (two threads collapse when another process holds the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
