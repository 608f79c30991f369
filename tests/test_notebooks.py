"""The research notebooks: jupytext pairs in sync, committed clean, and they run headless at smoke size.

Each notebook is a pair: ``notebooks/NN_name.py`` (jupytext percent format, the reviewed source) and
``notebooks/NN_name.ipynb`` (what Jupyter and papermill open), kept in step by jupytext
(``jupytext --sync notebooks/*.py``, or JupyterLab with jupytext installed).

Execution goes through papermill with ``smoke=True`` (2-layer model, a few tokens), in a Jupyter
kernel running this very interpreter. The runs share one xdist group, so under
``pytest -n 2 --dist loadgroup`` they take turns on one worker (each kernel already uses both
cores) while the other worker runs the rest of the suite.

Evidence (conftest.py restores the group, ``run_notebook`` bounds each run and uses unix sockets): pytest 9.2
dropped xdist 3.8's group tag, so kernels ran on both workers at once, two started in one second on TCP ports.

Why a run could sit idle for minutes (docs/notebooks.md, 'Headless runs'): nbclient plays the part of a
frontend for ``ipywidgets.Output`` and echoes every output captured by one back to the kernel on the shell
channel, from the coroutine that reads IOPub, while another coroutine waits on that socket for the cell's
``execute_reply``. A reply that lands during such a send can stay unread until the wait times out; the
kernel has long finished and idles. ``run_notebook`` runs inside ``flatquant_lab.notebook.headless_widgets``,
which turns the echo off (nobody reads that state headless).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from flatquant_lab.notebook import headless_widgets

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_numerics.ipynb", "02_clip_ratio_sweep.ipynb", "03_lm_eval_perplexity.ipynb", "04_kv_cache.ipynb"]
# Where a notebook writes checkpoints, pointed into the test's tmp_path (defaults: notebooks/outputs/).
OUTPUT_PARAMS = {"02_clip_ratio_sweep.ipynb": "output_dir", "03_lm_eval_perplexity.ipynb": "work_dir"}
CELL_TIMEOUT_S = 600  # a hung kernel fails the test instead of blocking the run
KERNEL_START_S = 60  # until the kernel answers kernel_info: under 3 s in 20 starts at load 7-10 on 2 cores
NOTEBOOK_RUN_S = 600  # all cells of one smoke run: ~30 s alone, 250 s at most seen at load 10 on 2 cores
SMOKE_MARK = "SMOKE RUN"


def pair_difference(py_path: Path, ipynb_path: Path) -> str | None:
    """jupytext's own comparison of the two halves of a pair (cells, their types, sources and metadata,
    as the percent format keeps them); None when in sync, else jupytext's description of the first difference."""
    import jupytext
    from jupytext.compare import NotebookDifference, compare_notebooks

    try:
        compare_notebooks(jupytext.read(py_path), jupytext.read(ipynb_path), fmt="py:percent")
    except NotebookDifference as exc:
        return str(exc)
    return None


def _code_sources(name: str) -> list[str]:
    import jupytext

    return [c.source for c in jupytext.read(NB_DIR / name.replace(".ipynb", ".py")).cells if c.cell_type == "code"]


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


def run_notebook(name: str, out: Path, parameters: dict, kernel_name: str) -> None:
    """papermill on ``notebooks/<name>`` into ``out``, in a kernel that talks over unix sockets in a fresh
    folder (no TCP port to race other processes for). The start is bounded by KERNEL_START_S and the run
    by NOTEBOOK_RUN_S: past it a watchdog kills the kernel, which ends any wait of nbclient within
    seconds, and the test fails naming what it waited for. Cell errors raise papermill's own error."""
    import signal
    import tempfile
    import threading

    import papermill
    from jupyter_client.manager import AsyncKernelManager

    sock_dir = tempfile.mkdtemp(prefix="fq-kernel-")  # short: a unix socket path holds ~100 bytes at most
    managers: list[AsyncKernelManager] = []
    state = {"what": f"kernel for {name} to start", "limit": KERNEL_START_S, "expired": None, "started": False}

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(transport="ipc", ip=os.path.join(sock_dir, "kernel"),
                             connection_file=os.path.join(sock_dir, "kernel.json"), **kw)
            managers.append(self)

    def expire():
        state["expired"] = (state["what"], state["limit"])
        for km in managers:
            proc = getattr(km.provisioner, "process", None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)

    timers = [threading.Timer(KERNEL_START_S + 30, expire)]  # papermill's own start_timeout comes first

    def started(**_):
        state.update(started=True, what=f"{name} to run its cells", limit=NOTEBOOK_RUN_S)
        timers[0].cancel()
        timers.append(threading.Timer(NOTEBOOK_RUN_S, expire))
        timers[-1].daemon = True
        timers[-1].start()

    def cell_starts(cell, cell_index, **_):
        state["what"] = f"{name} cell {cell_index} ({cell.source.strip().splitlines()[0][:60]!r}) to finish"

    def cell_done(cell, cell_index, **_):
        state["what"] = f"the kernel for {name} to answer after cell {cell_index}"

    timers[0].daemon = True
    timers[0].start()
    try:
        with headless_widgets():
            papermill.execute_notebook(str(NB_DIR / name), str(out), parameters=parameters, kernel_name=kernel_name,
                                       cwd=str(NB_DIR), progress_bar=False, start_timeout=KERNEL_START_S,
                                       execution_timeout=CELL_TIMEOUT_S, kernel_manager_class=IPCKernelManager,
                                       on_notebook_start=started, on_cell_execute=cell_starts,
                                       on_cell_executed=cell_done)
    except Exception as exc:
        if state["expired"]:
            what, limit = state["expired"]
            raise TimeoutError(f"{what}: not within {limit} s (kernel killed)") from exc
        if managers and not state["started"]:
            raise RuntimeError(f"kernel for {name} did not start within {KERNEL_START_S} s: {exc}") from exc
        raise
    finally:
        for t in timers:
            t.cancel()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_the_notebook_folder_holds_pairs_and_no_generator():
    assert sorted(p.name for p in NB_DIR.glob("*.ipynb")) == NOTEBOOKS
    assert sorted(p.name for p in NB_DIR.glob("*.py")) == [n.replace(".ipynb", ".py") for n in NOTEBOOKS]
    assert not (NB_DIR / "make_notebooks.py").exists()
    config = (NB_DIR / "jupytext.toml").read_text()
    assert re.search(r'^formats = "ipynb,py:percent"$', config, re.M), config


@pytest.mark.xdist_group("notebooks")
def test_kernel_tests_take_turns_on_one_xdist_worker(request):
    """Under ``--dist loadgroup`` the node ids of the kernel tests carry their group, which is what sends
    them to one worker (conftest.py tags them where pytest-xdist's own tag is lost); elsewhere, nothing to check."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@notebooks"), f"{request.node.nodeid}: xdist_group lost"


def test_headless_runs_do_not_echo_output_widget_state_on_the_shell_channel():
    """Inside ``notebook.headless_widgets`` the stand-in records outputs but sends nothing; outside, nbclient's own."""
    from nbclient.output_widget import OutputWidget

    sent = []

    class Channel:
        def send(self, msg):
            sent.append(msg)

    class Client:
        shell_channel = Channel()
        session = type("S", (), {"msg": staticmethod(lambda *a, **k: {"a": a, "k": k})})()

    widget = OutputWidget("c1", {"outputs": []}, Client(), executor=None)
    widget.parent_header = {}
    echo = OutputWidget.sync_state
    with headless_widgets():
        widget.sync_state()
        assert sent == []
    assert OutputWidget.sync_state is echo
    widget.sync_state()
    assert len(sent) == 1  # what a headless run avoids: a send on the socket the reply is awaited on


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_is_in_sync(name):
    diff = pair_difference(NB_DIR / name.replace(".ipynb", ".py"), NB_DIR / name)
    assert diff is None, f"{name} and its .py differ; run `jupytext --sync notebooks/*.py` (or save in JupyterLab):\n{diff}"


def test_pair_check_catches_an_edit_in_either_half(tmp_path):
    """The check above can fail: one changed line, a dropped tag or a removed cell in either file."""
    import jupytext

    py, nb = tmp_path / "n.py", tmp_path / "n.ipynb"
    name = NOTEBOOKS[1]
    shutil.copy(NB_DIR / name.replace(".ipynb", ".py"), py)
    shutil.copy(NB_DIR / name, nb)
    assert pair_difference(py, nb) is None
    text = py.read_text()
    py.write_text(text.replace("tokens: int = 256", "tokens: int = 512", 1))
    assert "Cell content differ" in pair_difference(py, nb)
    py.write_text(text.replace('# %% tags=["parameters"]', "# %%", 1))
    assert "Metadata differ" in pair_difference(py, nb)
    py.write_text(text)
    notebook = jupytext.read(nb)
    del notebook.cells[3]
    jupytext.write(notebook, nb)
    assert pair_difference(py, nb) is not None


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """No outputs or execution counts, and a tagged parameters cell first."""
    import nbformat

    path = NB_DIR / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} carry outputs; clear them (Edit > Clear Outputs of All Cells) and save"
    assert not nb.metadata.get("widgets"), f"{name}: saved widget state; clear it before committing"
    assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not tagged 'parameters'"
    assert "smoke" in code[0].source and "backend" in code[0].source


def test_notebooks_share_one_setup_cell():
    """The cell after the parameters (backend choice, logging, smoke notice, output folder) is the same in all,
    and it calls the package's ``flatquant_lab.notebook.setup`` instead of holding its own copy."""
    setups = {name: _code_sources(name)[1] for name in NOTEBOOKS}
    assert len(set(setups.values())) == 1, "the set-up cells differ; edit them all alike"
    assert "setup(backend=backend, threads=threads, smoke=smoke)" in setups[NOTEBOOKS[0]]
    assert "def " not in setups[NOTEBOOKS[0]], "helpers belong in flatquant_lab/notebook.py"


def _parameters(name: str) -> dict:
    """The values the parameters cell sets (plain assignments)."""
    values: dict = {}
    exec(_code_sources(name)[0], {}, values)  # noqa: S102 (the notebook's own parameters cell)
    return values


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_parameters_take_dtype_and_calibration_text_and_quantconfig_defaults(name):
    """Each notebook takes the model dtype ("auto": the model's own), the user's calibration text (None: the
    bundled split), and quantizes with what QuantConfig() does by default."""
    from flatquant_lab.recipe import QuantConfig

    params = _parameters(name)
    assert params["dtype"] == "auto" and params["calib_data"] is None, name
    default = QuantConfig()
    for field in ("method", "weight_quantizer", "profile"):
        if field in params:
            assert params[field] == getattr(default, field), (name, field)
    assert params["weight_quantizer"] == default.weight_quantizer and params["profile"] == default.profile, name


def test_notebook_helpers_for_quantizing(tmp_path):
    """calibration_for hands quantize the windows its config takes (none for RTN weights without training);
    checkpoint_dtype maps "auto" to None (the checkpoint's own)."""
    from flatquant_lab.notebook import calibration_for, checkpoint_dtype, smoke_budget
    from flatquant_lab.recipe import QuantConfig

    class Words:  # a tokenizer stand-in: one id per word
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1 + len(w) for w in t.split()] for t in texts]}

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["word"] * 400))
    cfg = QuantConfig(method="hadamard", weight_quantizer="gptq", **smoke_budget("hadamard"))
    assert calibration_for(cfg, text, Words()).shape == (4, 32)
    assert calibration_for(QuantConfig(method="rtn", weight_quantizer="rtn"), text, Words()) is None
    assert smoke_budget("flatquant")["epochs"] == 1 and "epochs" not in smoke_budget("hadamard")
    assert checkpoint_dtype("auto") is None and str(checkpoint_dtype("bfloat16")) == "torch.bfloat16"
    with pytest.raises(ValueError, match="^dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got 'fp8'"):
        checkpoint_dtype("fp8")


def test_notebook_setup_checks_its_parameters_and_marks_smoke_output(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from flatquant_lab.notebook import SMOKE_NOTICE, setup

    with pytest.raises(ValueError, match="backend: expected 'npu', 'reference' or None"):
        setup(backend="cuda")
    with pytest.raises(ValueError, match="backend: 'npu' needs torch_npu and an Ascend device"):
        setup(backend="npu")
    with pytest.raises(ValueError, match="threads: expected a positive int or None, got 0"):
        setup(threads=0)
    with pytest.raises(ValueError, match="smoke: expected True or False, got 'yes'"):
        setup(smoke="yes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)
    nb = setup(smoke=True, quiet_loaders=False)
    assert nb.backend == "reference" and str(nb.device) == "cpu" and os.environ["FLATQUANT_BACKEND"] == "reference"
    assert nb.output_folder("02_x") == str(tmp_path / "outputs" / "02_x-smoke")
    fig = plt.figure()
    assert "numbers meaningless" in nb.smoke_figure(fig).texts[0].get_text()
    plt.close(fig)
    assert nb.smoke_table(pd.DataFrame({"a": [1]})).caption == SMOKE_NOTICE
    fig = plt.figure()
    nb.show_figure(fig, str(tmp_path / "figs" / "f.png"))
    assert (tmp_path / "figs" / "f.png").read_bytes().startswith(b"\x89PNG") and fig.texts
    plt.close(fig)
    full = setup(smoke=False, quiet_loaders=False)
    df = pd.DataFrame({"a": [1]})
    assert full.smoke_table(df) is df and full.output_folder("02_x").endswith("02_x-full")
    monkeypatch.delenv("FLATQUANT_BACKEND", raising=False)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_cells_mark_smoke_figures_and_save_through_save_figure(name):
    """Every figure is stamped on smoke runs, and saved with fq.save_figure (atomic), never fig.savefig;
    nothing is written to a temporary folder that nobody removes."""
    sources = _code_sources(name)
    drawing = [src for src in sources if "plt.subplots(" in src]
    assert drawing and all("smoke_figure(fig)" in src or "nb.show_figure(fig" in src for src in drawing), name
    saving = [src for src in sources if "nb.show_figure(fig, figure_path)" in src]
    assert saving, f"{name}: no cell saves the figure through nb.show_figure (stamp, atomic save)"
    assert not any(".savefig(" in src or "save_figure(" in src for src in sources), \
        f"{name}: a cell saves a figure itself instead of through nb.show_figure"
    assert not any("tempfile" in src or "mkdtemp" in src for src in sources), name


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
def test_clip_sweep_notebook_tunes_a_flatquant_checkpoint(kernel_name, tmp_path):
    """Notebook 02 on a saved FlatQuant checkpoint (GPTQ weights, smoothing folded into the norms)."""
    import nbformat
    import torch

    import flatquant_lab as fq
    from flatquant_lab.data import bundled_data_path, calibration_ids

    model, tok = fq.load_model("smollm2-135m", num_layers=2)
    ids = calibration_ids(bundled_data_path("calib"), tok, n_samples=4, seqlen=32, seed=0)
    cfg = fq.QuantConfig(method="flatquant", weight_quantizer="gptq", samples=4, seqlen=32, epochs=1)
    fq.save_quantized(fq.quantize(model, cfg, ids), tmp_path / "fq", tokenizer=tok)
    out = tmp_path / "02.ipynb"
    run_notebook(NOTEBOOKS[1], out, {"smoke": True, "threads": torch.get_num_threads(), "quantized_dir": str(tmp_path / "fq"),
                                     "output_dir": str(tmp_path / "tuned")}, kernel_name)
    ran = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in ran.cells if c.cell_type == "code" for o in c.outputs)
    assert "14 W4A4 linears in 2 layers" in text
    assert "captured 64 calibration-set tokens (2 windows of 32) for each of 14 linears" in text
    # The readout lives in the widget's Output only: no static copy above it.
    assert "int4 path within its bound" not in text
    readout = widget_output_text(ran)
    assert "int4 path within its bound of the dequantized reference: True" in readout, readout
    assert readout.startswith("[smoke run: numbers meaningless] model.layers.1.mlp.down_proj at clip ratio 1.000")
    tuned = fq.load_quantized(tuned_checkpoint(text, tmp_path / "tuned"))
    assert sum(isinstance(m, fq.W4A4FlatQuantLinear) for m in tuned.modules()) == 14


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
def test_clip_sweep_notebook_tunes_an_msmodelslim_checkpoint(kernel_name, tmp_path):
    """Notebook 02 on a checkpoint in msModelSlim's own layout (v1 file names, W4A4 FlatQuant q/k/v and
    gate/up, W8A8_DYNAMIC o/down, a FLOAT MLP), written by the test helper from
    docs/checkpoint-format.md."""
    import nbformat
    import torch

    import flatquant_lab as fq
    from msmodelslim_fixture import write_msmodelslim

    model, tok = fq.load_model("smollm2-135m", num_layers=2)
    path = write_msmodelslim(tmp_path / "msms", model)
    tok.save_pretrained(str(path))
    out = tmp_path / "02.ipynb"
    run_notebook(NOTEBOOKS[1], out, {"smoke": True, "threads": torch.get_num_threads(), "quantized_dir": str(path),
                                     "output_dir": str(tmp_path / "tuned")}, kernel_name)
    ran = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in ran.cells if c.cell_type == "code" for o in c.outputs)
    # layer 0: q/k/v + gate/up W4A4, o/down W8A8; layer 1: q/k/v W4A4, o W8A8, its MLP float
    assert "8 W4A4 linears in 2 layers" in text and "3 W8A8_DYNAMIC linears (no clip ratio) left as they are" in text
    tuned = fq.load_quantized(tuned_checkpoint(text, tmp_path / "tuned"))
    assert sum(isinstance(m, fq.W4A4FlatQuantLinear) for m in tuned.modules()) == 8
    assert sum(type(m).__name__ == "W8A8DynamicLinear" for m in tuned.modules()) == 3


def tuned_checkpoint(text: str, out: Path) -> Path:
    """Where notebook 02 wrote its tuned checkpoint: ``out`` when the evaluation perplexity did not get worse,
    else ``<out>-worse``, after saying so with both figures; never both."""
    worse = re.search(r"evaluation-set perplexity got WORSE with the chosen clip ratios: (\S+) -> (\S+) ", text)
    kept = re.search(r"evaluation-set perplexity (\S+) -> (\S+), not worse", text)
    assert (worse is None) != (kept is None), text
    before, after = (float(v) for v in (worse or kept).groups())
    if worse:
        assert after >= before and f"The tuned checkpoint is NOT written to {out}; it goes to {out}-worse" in text
        written, absent = Path(f"{out}-worse"), out
    else:
        assert after <= before
        written, absent = out, Path(f"{out}-worse")
    assert f"wrote {written} (" in text and written.is_dir() and not absent.exists(), text
    return written


def widget_output_text(nb) -> str:
    """The text that ipywidgets Output widgets held when the notebook was saved (nbclient stores their state)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return "".join(o.get("text", "") for m in state.values() if m["model_name"] == "OutputModel"
                   for o in m["state"].get("outputs", []))


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
    import nbformat

    # The kernel gets the test process's threads (conftest: FLATQUANT_TEST_THREADS, else half the cores): with
    # 2 workers on 2 cores, more threads only thrash (a smoke run went from ~30 s to ~300 s on a loaded machine).
    import torch

    params = {"smoke": True, "threads": torch.get_num_threads()}
    if name in OUTPUT_PARAMS:
        params[OUTPUT_PARAMS[name]] = str(tmp_path / "out")
    t0 = time.perf_counter()
    # Raises PapermillExecutionError, naming the cell and the exception, if any cell fails.
    run_notebook(name, tmp_path / name, params, kernel_name)
    seconds = time.perf_counter() - t0
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")
    ran = nbformat.read(tmp_path / name, as_version=4)
    outputs = [(i, o) for i, c in enumerate(ran.cells) if c.cell_type == "code" for o in c.outputs]
    # Nothing on stderr: no plain progress bars, no git noise, information logged as information.
    stderr = [(i, o.text[:200]) for i, o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    tables = [(i, o.data["text/html"]) for i, o in outputs if "<table" in o.get("data", {}).get("text/html", "")]
    assert tables and all(SMOKE_MARK in html for _, html in tables), [i for i, h in tables if SMOKE_MARK not in h]
    assert any(SMOKE_MARK in o.get("data", {}).get("text/markdown", "") for _, o in outputs)
    text = "".join(o.get("text", "") for _, o in outputs if o.output_type == "stream")
    if name.startswith("01"):
        # what the calibrated layer holds, to 4 significant digits (not a rounder copy of a report's value)
        held = re.search(r"calibrated (\w+) transform of layer 0 \(gptq weights, profile fast\) in "
                         r".*?; clip ratio the layer holds (\S+?)[ \n]", text)
        assert held and 0 < float(held[2]) <= 1, text
    elif name.startswith("02"):
        assert "quantized here: method flatquant, gptq weights, profile fast, torch.float32" in text, text
        tuned_checkpoint(text, tmp_path / "out")
    elif name.startswith("03"):
        for method in ("rtn", "hadamard", "flatquant"):
            assert f"{method}: quantized (gptq weights, profile fast, torch.float32, calibration text " in text, text
    else:
        assert "quantized here: method flatquant, gptq weights, profile fast, KV4 with kv_transforms='kv'" in text, text
        assert "2 KV4 caches; looking at model.layers.1.self_attn: KV4Cache(KV4, num_kv_heads=3, head_dim=64" in text


def test_lab_requirements_carry_the_test_pins():
    """`make lab` installs requirements-lab.txt over requirements.txt: the same jupyterlab and jupytext."""
    root = NB_DIR.parent

    def pins(name):
        return {ln.strip() for ln in (root / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")}

    lab = pins("requirements-lab.txt")
    assert {p.split("==")[0] for p in lab} >= {"jupyterlab", "jupytext"}
    assert lab <= pins("requirements.txt"), lab - pins("requirements.txt")
