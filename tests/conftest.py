import os

# OpenMP threads wait asleep, not spinning: with FLATQUANT_TEST_THREADS=2 the two xdist workers run 4 threads on
# 2 cores, and spinning waiters starved the working ones (docs/results.md, 'The test suite at two threads').
# It must be set before torch loads OpenMP; notebook kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# torch threads per test process (and per notebook kernel): FLATQUANT_TEST_THREADS (`make test THREADS=N`),
# else half the cores, so that two pytest-xdist workers on 2 cores do not oversubscribe them.
_threads = os.environ.get("FLATQUANT_TEST_THREADS", "")
if _threads and not (_threads.isdigit() and int(_threads) > 0):
    raise ValueError(f"FLATQUANT_TEST_THREADS: expected a positive int, got {_threads!r}")
TEST_THREADS = int(_threads) if _threads else max(1, (os.cpu_count() or 2) // 2)
torch.set_num_threads(TEST_THREADS)


def pytest_report_header(config):
    return f"torch threads per test process: {TEST_THREADS} (FLATQUANT_TEST_THREADS to change)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled model's tokenizer (its cache is converted once per machine, shared with the other tests)."""
    from transformers import AutoTokenizer

    from flatquant_lab.hub import resolve

    return AutoTokenizer.from_pretrained(str(resolve("smollm2-135m")), local_files_only=True)


@pytest.fixture
def fake(monkeypatch):
    """The torch_npu test double (tests/fake_torch_npu.py) in place of torch_npu, backend left on auto."""
    import sys

    from fake_torch_npu import make_fake_torch_npu

    double = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)
    return double


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep ``--dist loadgroup`` grouping: pytest-xdist 3.8 tags an ``xdist_group`` item by setting
    ``item._nodeid``, which pytest 9.2 no longer reads (a node's id is ``item._id``), so every group was
    silently split over both workers (the notebook kernels ran two at a time). Tag them where xdist could not."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest, where xdist's own tag works
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        tag = "@" + "_".join(names)
        if names and hasattr(item, "_id") and not item.nodeid.endswith(tag):
            item._id = NodeId.parse(item.nodeid + tag)


@pytest.fixture
def keep_last_epoch(monkeypatch):
    """The guard sees every epoch as better than the one before, so the stage keeps its last state: for tests of
    what training moves, independent of whether it helped on this machine."""
    from flatquant_lab.calibrate import e2e

    calls = []

    def falling(model, calib_ids, teacher_hidden, idx, norm, head, bs):
        calls.append(1)
        return torch.full((len(idx),), 1.0 / len(calls), dtype=torch.float64)

    monkeypatch.setattr(e2e, "_heldout_kl", falling)
    return calls


@pytest.fixture
def spoil_every_epoch(monkeypatch):
    """``spoil_every_epoch(spoil)``: after each end-to-end epoch, ``spoil(module)`` on every module of the model
    (under no_grad), to make every epoch worse on purpose."""
    from flatquant_lab.calibrate import e2e

    def install(spoil) -> None:
        real = e2e._train_epoch

        def spoiled(model, *args, **kwargs):
            out = real(model, *args, **kwargs)
            with torch.no_grad():
                for m in model.modules():
                    spoil(m)
            return out

        monkeypatch.setattr(e2e, "_train_epoch", spoiled)

    return install
