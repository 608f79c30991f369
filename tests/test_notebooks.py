"""The research notebooks: they run headless at smoke size, and are committed clean.

Execution goes through papermill with ``smoke=True`` (2-layer model, a few tokens), in a Jupyter
kernel running this very interpreter. The three runs share one xdist group, so under
``pytest -n 2 --dist loadgroup`` they take turns on one worker (each kernel already uses both
cores) while the other worker runs the rest of the suite.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_numerics.ipynb", "02_clip_ratio_sweep.ipynb", "03_lm_eval_perplexity.ipynb"]
# Where a notebook writes checkpoints, pointed into the test's tmp_path (defaults are temp folders).
OUTPUT_PARAMS = {"02_clip_ratio_sweep.ipynb": "output_dir", "03_lm_eval_perplexity.ipynb": "work_dir"}
CELL_TIMEOUT_S = 600  # a hung kernel fails the test instead of blocking the run


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs_this_python(argv0: str) -> bool:
    # jupyter_client swaps a bare "python"/"python3"/"python3.X" for sys.executable when launching.
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return argv0 in bare or os.path.realpath(argv0) == os.path.realpath(sys.executable)


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory) -> str:
    """``python3`` when that kernel spec runs this interpreter (the venv's); else a spec made here that does."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if _runs_this_python(spec.argv[0]):
            return "python3"
    except NoSuchKernel:
        pass
    root = tmp_path_factory.mktemp("jupyter")
    kdir = root / "kernels" / "flatquant-lab-test"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "flatquant_lab test kernel", "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))
    return "flatquant-lab-test"


def test_generator_lists_the_notebooks():
    assert sorted(_load_generator().NOTEBOOKS) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """No outputs or execution counts, a tagged parameters cell first, and in sync with the generator."""
    import nbformat

    path = NB_DIR / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} carry outputs; regenerate with notebooks/make_notebooks.py"
    assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not tagged 'parameters'"
    assert "smoke" in code[0].source and "backend" in code[0].source
    fresh = nbformat.writes(_load_generator().NOTEBOOKS[name]())
    assert path.read_text().rstrip("\n") == fresh.rstrip("\n"), f"{name} differs from what notebooks/make_notebooks.py writes; rerun it"


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
def test_clip_sweep_notebook_tunes_a_flatquant_checkpoint(kernel_name, tmp_path):
    """Notebook 02 on a saved FlatQuant checkpoint (GPTQ weights, smoothing folded into the norms)."""
    import nbformat
    import papermill
    import torch

    import flatquant_lab as fq
    from flatquant_lab.data import bundled_data_path, calibration_ids

    torch.set_num_threads(1)
    model, tok = fq.load_model("smollm2-135m", num_layers=2)
    ids = calibration_ids(bundled_data_path("calib"), tok, n_samples=4, seqlen=32, seed=0)
    cfg = fq.QuantConfig(method="flatquant", weight_quantizer="gptq", samples=4, seqlen=32, epochs=1)
    fq.save_quantized(fq.quantize(model, cfg, ids), tmp_path / "fq", tokenizer=tok)
    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(str(NB_DIR / NOTEBOOKS[1]), str(out), kernel_name=kernel_name, cwd=str(NB_DIR),
                               parameters={"smoke": True, "threads": 1, "quantized_dir": str(tmp_path / "fq"),
                                           "output_dir": str(tmp_path / "tuned")},
                               progress_bar=False, execution_timeout=CELL_TIMEOUT_S)
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "14 W4A4 linears in 2 layers" in text and "captured 64 tokens for each of 14 linears" in text
    assert "int4 path within its bound of the dequantized reference: True" in text
    tuned = fq.load_quantized(tmp_path / "tuned")
    assert sum(isinstance(m, fq.W4A4FlatQuantLinear) for m in tuned.modules()) == 14


def test_generator_writes_each_notebook_atomically(tmp_path, monkeypatch):
    """Temp file beside the target, then a rename: an interrupted run never leaves a torn .ipynb."""
    import nbformat

    gen = _load_generator()
    monkeypatch.setattr(gen, "HERE", tmp_path)
    target = tmp_path / NOTEBOOKS[0]
    target.write_text("old\n")
    inode = target.stat().st_ino
    assert gen.main([NOTEBOOKS[0]]) == 0
    assert target.stat().st_ino != inode  # replaced, not rewritten in place
    good = nbformat.writes(gen.NOTEBOOKS[NOTEBOOKS[0]]()) + "\n"
    assert target.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [NOTEBOOKS[0]]
    # A failure half-way through the write leaves the previous file whole and no temp file behind
    # (a lone surrogate cannot be encoded as UTF-8).
    monkeypatch.setattr(gen.nbformat, "writes", lambda nb, *args, **kwargs: '{"cells": [' + chr(0xD800))
    with pytest.raises(UnicodeEncodeError):
        gen.main([NOTEBOOKS[0]])
    assert target.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [NOTEBOOKS[0]]


def test_generator_cells_save_figures_through_save_figure():
    """Figures are saved with fq.save_figure (atomic), never fig.savefig straight onto figure_path."""
    gen = _load_generator()
    for name in NOTEBOOKS:
        sources = [c.source for c in gen.NOTEBOOKS[name]().cells if c.cell_type == "code"]
        saving = [src for src in sources if "if figure_path:" in src]
        assert saving, f"{name}: no cell saves the figure"
        assert not any(".savefig(" in src for src in sources), f"{name}: a cell calls savefig directly"
        assert all("fq.save_figure(fig, figure_path" in src for src in saving), name


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import flatquant_lab as fq

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    try:
        path = tmp_path / "sub" / "fig.png"  # the folder is created
        assert fq.save_figure(fig, path, dpi=50) == path
        assert path.read_bytes().startswith(b"\x89PNG")
        inode = path.stat().st_ino
        fq.save_figure(fig, str(path), dpi=60)
        assert path.stat().st_ino != inode and path.read_bytes().startswith(b"\x89PNG")
        assert fq.save_figure(fig, tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")  # format from suffix
        before = path.read_bytes()

        def torn(fname, **kwargs):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError("disk full (injected)")

        monkeypatch.setattr(fig, "savefig", torn)
        with pytest.raises(OSError, match="injected"):
            fq.save_figure(fig, path)
        assert path.read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.png"]
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="path: expected a file path"):
        fq.save_figure(fig, "")


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name, kernel_name, tmp_path, record_property):
    import papermill

    # One torch thread per kernel, as conftest gives each xdist worker: with 2 workers on 2 cores, more
    # threads only thrash (a smoke run went from ~30 s to ~300 s on a loaded machine).
    params = {"smoke": True, "threads": max(1, (os.cpu_count() or 2) // 2)}
    if name in OUTPUT_PARAMS:
        params[OUTPUT_PARAMS[name]] = str(tmp_path / "out")
    t0 = time.perf_counter()
    # Raises PapermillExecutionError, naming the cell and the exception, if any cell fails.
    papermill.execute_notebook(str(NB_DIR / name), str(tmp_path / name), parameters=params,
                               kernel_name=kernel_name, cwd=str(NB_DIR), progress_bar=False,
                               execution_timeout=CELL_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")
