import os

import pytest
import torch

# Two pytest-xdist workers share 2 cores: one thread each avoids oversubscription.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fake(monkeypatch):
    """The torch_npu test double (tests/fake_torch_npu.py) in place of torch_npu, backend left on auto."""
    import sys

    from fake_torch_npu import make_fake_torch_npu

    double = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)
    return double
