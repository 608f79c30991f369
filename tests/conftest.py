import os

import pytest
import torch

# Two pytest-xdist workers share 2 cores: one thread each avoids oversubscription.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
