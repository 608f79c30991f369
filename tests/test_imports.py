"""Importing the package has no side effects."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flatquant_lab"

SNAPSHOT = """
import json, os, sys, torch
def state():
    return {"environ": dict(os.environ), "dtype": str(torch.get_default_dtype()),
            "device": str(torch.get_default_device()), "threads": torch.get_num_threads(),
            "matmul": torch.get_float32_matmul_precision(), "grad": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}
before = state()
import importlib, pkgutil
import flatquant_lab
names = sorted(m.name for m in pkgutil.walk_packages(flatquant_lab.__path__, "flatquant_lab.")
               if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
import flatquant_lab.devices as devices
print(json.dumps({"before": before, "after": state(), "modules": len(names),
                  "malloc": devices._host_malloc_set}))
"""


def test_importing_every_module_changes_no_environment_variable_torch_default_or_allocator():
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, env=env, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] > 40
    changed = {k: (got["before"]["environ"].get(k), v) for k, v in got["after"]["environ"].items()
               if got["before"]["environ"].get(k) != v}
    changed.update({k: (got["before"]["environ"][k], None) for k in got["before"]["environ"]
                    if k not in got["after"]["environ"]})
    assert not changed, changed
    assert {k: v for k, v in got["after"].items() if k != "environ"} == \
        {k: v for k, v in got["before"].items() if k != "environ"}
    assert got["malloc"] is False


def test_the_package_imports_under_a_meta_default_device():
    """Nothing computes a tensor at import (a meta default device would make it fail or hold a meta tensor)."""
    code = ("import torch, importlib, pkgutil\ntorch.set_default_device('meta')\nimport flatquant_lab\n"
            "for m in pkgutil.walk_packages(flatquant_lab.__path__, 'flatquant_lab.'):\n"
            "    importlib.import_module(m.name) if not m.name.endswith('__main__') else None\n"
            "from flatquant_lab.packing import pack_int4\n"
            "torch.set_default_device('cpu')\n"
            "print(pack_int4(torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)).tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[[-19088744], [1985229328]]"  # 0xFEDCBA98, 0x76543210


def test_offline_switch_applies_inside_and_is_undone(monkeypatch):
    import huggingface_hub.constants as hub_constants

    from flatquant_lab.offline import OFFLINE_VARS, offline

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # a user's explicit setting wins inside too
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with offline():
        assert hub_constants.HF_HUB_OFFLINE is True
        assert __import__("os").environ["HF_HUB_OFFLINE"] == "1"
        assert __import__("os").environ["HF_DATASETS_OFFLINE"] == "0"
    import os

    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert os.environ["HF_DATASETS_OFFLINE"] == "0" and hub_constants.HF_HUB_OFFLINE is False
    with pytest.raises(RuntimeError, match="inside"):
        with offline():
            raise RuntimeError("inside")
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False
