"""Importing the package has no side effects, and its modules import one way (README, Layout)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flatquant_lab"

# Lowest first: a module may import from its own floor and the floors below it, never from one above.
# The top-level modules that are not a package of their own sit where what they import puts them.
FLOORS = (
    ("utilities", {"checks", "dtypes", "devices", "files", "extras", "offline"}),
    ("packing, quantizers, mxfp4, kronecker, transforms, recipe",
     {"packing", "quantizers", "mxfp4", "kronecker", "transforms", "recipe"}),
    ("ops", {"ops"}),
    ("layers", {"layers"}),
    ("schemes", {"schemes"}),
    ("models", {"models"}),
    ("numerics", {"numerics"}),
    ("calibrate", {"gptq", "calibrate", "api"}),
    ("io", {"io"}),
    ("eval", {"data", "hub", "eval"}),
    ("cli, notebooks", {"cli", "demo", "notebook", "wikidata"}),
)
FLOOR_OF = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every flatquant_lab module ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                found.update([target] if node.module else [f"{target}.{a.name}" for a in node.names])
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("flatquant_lab.")}


def _unit(module: str) -> str:
    """The first name under flatquant_lab: ``flatquant_lab.io.load`` -> ``io``."""
    return module.split(".")[1]


def test_every_module_has_a_floor():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"}
    units.discard("__version__")
    assert units <= set(FLOOR_OF), f"modules without a floor in FLOORS: {sorted(units - set(FLOOR_OF))}"


def test_no_module_imports_from_a_floor_above_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue  # the package's face: lazy names from every floor
        here = _module_name(path)
        for target in sorted(_imports(path)):
            if _unit(target) in FLOOR_OF and FLOOR_OF[_unit(target)] > FLOOR_OF[_unit(here)]:
                wrong.append(f"{here} ({FLOORS[FLOOR_OF[_unit(here)]][0]}) imports {target} "
                             f"({FLOORS[FLOOR_OF[_unit(target)]][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_floor_check_sees_a_lower_module_importing_a_higher_one(tmp_path, monkeypatch):
    fake = tmp_path / "flatquant_lab"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "late.py").write_text("def f():\n    from ..io import load_quantized\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"flatquant_lab.ops.late \(ops\) imports flatquant_lab.io"):
        test_no_module_imports_from_a_floor_above_its_own()


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
