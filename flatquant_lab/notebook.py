"""What every notebook's set-up cell does, once: the backend, threads, logging as information, smoke notices.

    from flatquant_lab.notebook import setup
    nb = setup(backend=backend, threads=threads, smoke=smoke)   # nb.backend, nb.device
    nb.smoke_figure(fig); display(nb.smoke_table(df)); out = nb.output_folder("02_clip_ratio_sweep")
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .checks import positive_int

SMOKE_NOTICE = ("SMOKE RUN: the model is truncated to 2 layers and every budget is a token one, so these "
                "numbers say only that the code runs; they say nothing about quantization quality.")


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def route_logging() -> None:
    """flatquant_lab's INFO lines as plain text on stdout (information), its warnings on stderr (marked).

    The handlers are assigned, not appended, so running a set-up cell again adds no duplicates.
    """
    info = logging.StreamHandler(sys.stdout)
    info.setFormatter(logging.Formatter("%(message)s"))
    info.addFilter(_Below(logging.WARNING))
    warn = logging.StreamHandler(sys.stderr)
    warn.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    warn.setLevel(logging.WARNING)
    log = logging.getLogger("flatquant_lab")
    log.handlers[:] = [info, warn]
    log.setLevel(logging.INFO)
    log.propagate = False


@dataclass
class Session:
    """One notebook run: where it computes and whether it is a smoke run."""

    backend: str
    device: torch.device
    smoke: bool
    on_ascend: bool
    started: float = field(default_factory=time.perf_counter)

    def smoke_figure(self, fig):
        """On a smoke run, stamp the notice across the figure, so that no copy of it travels without it."""
        if self.smoke:
            fig.text(0.5, 0.5, "SMOKE RUN (2-layer truncation)\nnumbers meaningless", ha="center", va="center",
                     fontsize=20, color="tab:red", alpha=0.35, rotation=12, zorder=10)
        return fig

    def show_figure(self, fig, path=None) -> None:
        """Stamp a smoke run's figure, save it to ``path`` when given (atomic: temp file + rename), show it."""
        import matplotlib.pyplot as plt

        from .files import save_figure

        self.smoke_figure(fig)
        if path:
            save_figure(fig, path, dpi=120, bbox_inches="tight")
            print(f"saved {path}")
        plt.show()

    def smoke_table(self, df):
        """On a smoke run, the table (a DataFrame or its Styler) with the notice as its caption; else as it is."""
        if not self.smoke:
            return df
        style = df if hasattr(df, "set_caption") else df.style
        return style.set_caption(SMOKE_NOTICE).set_table_styles(
            [{"selector": "caption", "props": "color: #b00; font-weight: bold; caption-side: top"}], overwrite=False)

    def output_folder(self, notebook: str) -> str:
        """``outputs/<notebook>-<smoke|full>/`` below the working directory: git-ignored, overwritten by the
        next run of the same size, yours to reuse or delete."""
        path = os.path.abspath(os.path.join("outputs", f"{notebook}-{'smoke' if self.smoke else 'full'}"))
        os.makedirs(path, exist_ok=True)
        return path

    def banner(self) -> str:
        from . import __version__

        where = " (torch_npu found)" if self.on_ascend else " (no Ascend device: CPU reference ops)"
        return (f"flatquant_lab {__version__}; backend {self.backend} on {self.device}, "
                f"{torch.get_num_threads()} thread(s){where}; smoke={self.smoke}")


def setup(backend: str | None = None, threads: int | None = None, smoke: bool = False,
          quiet_loaders: bool = True) -> Session:
    """Validate a notebook's common parameters and set the session up.

    ``backend``: ``"npu"``, ``"reference"`` or ``None`` (npu on an Ascend host, else reference); layers built
    without an explicit backend follow it (``FLATQUANT_BACKEND``). ``threads``: torch CPU threads.
    ``quiet_loaders``: no progress bar per model load or text read (quick here; long steps have their own).
    """
    from .ops import npu as fq_npu

    on_ascend = fq_npu.is_available()  # imports torch_npu lazily; False off an Ascend host
    if backend is None:
        backend = "npu" if on_ascend else "reference"
    if backend not in ("npu", "reference"):
        raise ValueError(f"backend: expected 'npu', 'reference' or None (auto-detect), got {backend!r}")
    if backend == "npu" and not on_ascend:
        raise ValueError("backend: 'npu' needs torch_npu and an Ascend device, and none was found; "
                         "use 'reference' or None")
    if threads is not None:
        positive_int(threads, "threads", " or None")
        torch.set_num_threads(threads)
    if not isinstance(smoke, bool):
        raise ValueError(f"smoke: expected True or False, got {smoke!r}")
    os.environ["FLATQUANT_BACKEND"] = backend
    route_logging()
    if quiet_loaders:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    return Session(backend, torch.device("npu" if backend == "npu" else "cpu"), smoke, on_ascend)


def smoke_budget(method: str) -> dict:
    """``QuantConfig`` budget fields of a smoke run: a token calibration set (4 windows of 32 tokens), and for
    FlatQuant one epoch and no clip-ratio grid searches (those alone would outlast the run)."""
    budget = dict(samples=4, seqlen=32)
    if method == "flatquant":
        budget.update(epochs=1, act_clip_init=4.0, weight_clip_init=4.0)
    return budget


def calibration_for(cfg, source, tokenizer, seed: int = 0):
    """The calibration windows ``quantize(model, cfg, ...)`` takes: ``cfg.data.samples`` windows of
    ``cfg.data.seqlen`` tokens of ``source`` (a .jsonl with a "text" field, or a text file); None when ``cfg``
    uses none (method rtn or hadamard with RTN weights)."""
    from .data import calibration_ids

    if cfg.method != "flatquant" and cfg.weight_quantizer != "gptq":
        return None
    return calibration_ids(source, tokenizer, cfg.data.samples, cfg.data.seqlen, seed=seed)


def checkpoint_dtype(dtype):
    """``load_quantized``'s ``dtype`` for a notebook's ``dtype`` parameter: None (the checkpoint's own, from its
    config.json) for ``"auto"``, else that dtype (checked: float32, bfloat16 or float16)."""
    from .dtypes import as_dtype

    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return None
    try:
        return as_dtype(dtype)
    except ValueError:
        raise ValueError(f"dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}") from None


def folder_mib(path) -> float:
    """Size of the files below ``path``, in MiB."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


@contextmanager
def headless_widgets():
    """Run papermill/nbclient inside this so a cell with an ``ipywidgets.Output`` cannot stall (docs/notebooks.md).

    nbclient stands in for a frontend and echoes what an ``Output`` widget captures back to the kernel on the
    shell channel, from the coroutine reading IOPub, while another waits on that socket for the cell's
    ``execute_reply``; a reply arriving during such a send can stay unread until that wait times out (forever
    without a timeout). Inside, the stand-in still records the captured outputs in the saved notebook's widget
    state, and sends nothing (no kernel reads that state in a headless run).
    """
    from nbclient.output_widget import OutputWidget

    echo = OutputWidget.sync_state
    OutputWidget.sync_state = lambda self: None
    try:
        yield
    finally:
        OutputWidget.sync_state = echo
