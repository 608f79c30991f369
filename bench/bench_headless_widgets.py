"""Headless runs of a notebook whose cells display ipywidgets ``Output`` widgets, with nbclient's echo of the
widget's outputs to the kernel (as papermill runs it) and inside ``flatquant_lab.notebook.headless_widgets``,
alternating, side by side. A cell whose ``execute_reply`` is stranded (docs/notebooks.md, 'Headless runs')
takes exactly the cell timeout: it is found only when the wait for it times out.

    python bench/bench_headless_widgets.py --pairs 10 --cell-timeout 20
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
import papermill
from jupyter_client.manager import AsyncKernelManager

from flatquant_lab.notebook import headless_widgets

# The shape of notebook 02's live readout: a slider and a dropdown driving an interactive_output that prints a
# line and shows a figure, displayed once per cell.
WIDGET_CELL = """import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

def show(ratio, name):
    print(f"{name} at clip ratio {ratio:.3f}")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, ratio])
    plt.show()

slider = widgets.FloatSlider(value=1.0, min=0.5, max=1.0)
layer = widgets.Dropdown(options=["a", "b"], value="b")
display(widgets.VBox([widgets.HBox([slider, layer]), widgets.interactive_output(show, {"ratio": slider, "name": layer})]))"""


class UnixSocketKernel(AsyncKernelManager):
    """A kernel on unix sockets in a fresh folder, as the test suite starts them."""

    def __init__(self, **kw):
        folder = tempfile.mkdtemp(prefix="fq-bench-kernel-")
        super().__init__(transport="ipc", ip=os.path.join(folder, "kernel"),
                         connection_file=os.path.join(folder, "kernel.json"), **kw)


def run_once(path: Path, out: Path, cell_timeout: int) -> tuple[float, list[float]]:
    """Wall seconds of one headless run and the durations of its cells that took over half the cell timeout."""
    t0 = time.perf_counter()
    papermill.execute_notebook(str(path), str(out), kernel_name="python3", progress_bar=False, log_output=False,
                               execution_timeout=cell_timeout, kernel_manager_class=UnixSocketKernel)
    cells = nbformat.read(out, as_version=4).cells
    slow = [round(c.metadata.papermill.duration, 1) for c in cells
            if (c.metadata.papermill.duration or 0) > cell_timeout / 2]
    return time.perf_counter() - t0, slow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10, help="runs of each variant, alternating (default 10)")
    ap.add_argument("--cell-timeout", type=int, default=20, help="seconds a cell may take (default 20)")
    ap.add_argument("--cells", type=int, default=6, help="widget cells in the notebook (default 6)")
    args = ap.parse_args()
    if args.pairs < 1 or args.cell_timeout < 1 or args.cells < 1:
        ap.error("--pairs, --cell-timeout and --cells: expected positive ints")
    work = Path(tempfile.mkdtemp(prefix="fq-bench-widgets-"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%matplotlib inline")]
    nb.cells += [nbformat.v4.new_code_cell(WIDGET_CELL) for _ in range(args.cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = work / "widgets.ipynb"
    nbformat.write(nb, path)
    stranded = {"echo": [], "headless_widgets": []}
    for i in range(args.pairs):
        for variant in stranded:
            if variant == "echo":
                seconds, slow = run_once(path, work / "out.ipynb", args.cell_timeout)
            else:
                with headless_widgets():
                    seconds, slow = run_once(path, work / "out.ipynb", args.cell_timeout)
            stranded[variant].append(len(slow))
            print(f"pair {i} {variant:>16}: {seconds:5.1f} s, cells near the timeout: {slow}", flush=True)
    for variant, counts in stranded.items():
        print(f"{variant:>16}: {sum(counts)} stranded replies in {args.pairs * args.cells} widget cells "
              f"({sum(1 for c in counts if c)} of {args.pairs} runs)")


if __name__ == "__main__":
    main()
