"""Notebook 02 as a researcher meets it: JupyterLab in headless Chromium, every cell run, the slider live.

The test starts its own JupyterLab (127.0.0.1, a free port, a token of its own, no browser, config,
data, runtime and settings folders under tmp) on a copy of ``notebooks/02_clip_ratio_sweep.ipynb``
with ``smoke=True`` injected the way papermill does, and drives Debian's ``chromium`` through
Playwright's Python client (never ``playwright install``: the system browser is enough). It runs
all cells from the Run menu, drags the clip-ratio slider, and asserts that the readout and the plot
follow and that no cell shows an error or a stderr block. Where chromium is missing the test is skipped.

Every start and run is bounded and fails naming what it waited for: the server's /api/status (a port
taken between our pick and its bind is retried), chromium, the page, the kernel going idle, the run.
The server's kernels use unix sockets in a folder of their own, as the notebook tests' do (no TCP
ports picked by binding port 0 and letting go, which another process may take in between).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "02_clip_ratio_sweep.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 90
SERVER_TRIES = 3  # fresh ports, when another process took ours before the server bound it
BROWSER_START_S = 60
PAGE_LOAD_S = 60
KERNEL_IDLE_S = 120
RUN_ALL_S = 420  # all of notebook 02 at smoke size: about 20 s alone, several times that beside other tests
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'  # how JupyterLab renders tracebacks and stderr

# Its own xdist group: the kernel and the browser need both cores, as the notebook runs do.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("notebooks")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(dest: Path) -> Path:
    """The notebook with smoke=True and the test process's threads, injected after the parameters cell as papermill
    does."""
    import nbformat
    import torch
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    params = {"smoke": True, "threads": torch.get_num_threads()}
    nb = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / NOTEBOOK)), params)
    path = dest / NOTEBOOK
    nbformat.write(nb, path)
    return path


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server of this test's own; yields (base url, token); stopped afterwards."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip("Debian's chromium is not installed: `apt-get install chromium` to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="playwright (requirements.txt) is not installed")
    pytest.importorskip("jupyterlab", reason="jupyterlab (requirements.txt) is not installed")
    root = tmp_path / "lab"
    root.mkdir()
    _smoke_copy(root)
    dirs = {name: tmp_path / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir()
    # The notebook's kernel starts without a dialog; cells off screen are still rendered, so that their
    # outputs can be read; no news is fetched (nor an update check, below).
    for plugin, settings in (("notebook-extension/tracker", {"windowingMode": "none", "autoStartDefaultKernel": True}),
                             ("apputils-extension/notification", {"fetchNews": "false"})):
        path = dirs["settings"] / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    token = secrets.token_hex(16)
    sock_dir = tempfile.mkdtemp(prefix="fq-lab-")  # the kernels' unix sockets: a short path (~100 bytes at most)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log_path = tmp_path / "jupyterlab.log"
    server = log = None
    try:
        for attempt in range(SERVER_TRIES):
            port = _free_port()
            log = open(log_path, "wb")
            server = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                 f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                 f"--ServerApp.root_dir={root}", "--KernelManager.transport=ipc",
                 f"--KernelManager.ip={os.path.join(sock_dir, 'kernel')}",
                 "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                 "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),  # CI is root
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            if _await_status(server, base, token, log_path):
                break
            log.close()
            if attempt == SERVER_TRIES - 1:
                raise RuntimeError(f"JupyterLab server: port taken {SERVER_TRIES} times over; last log: "
                                   f"{log_path.read_text()[-2000:]}")
        yield base, token
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=20)
        if log is not None:
            log.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _await_status(server, base: str, token: str, log_path: Path) -> bool:
    """True once the server answers /api/status; False if it exited because its port was taken; else raises,
    naming the wait."""
    port = base.rsplit(":", 1)[1]
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if server.poll() is not None:
            text = log_path.read_text()
            if "is already in use" in text or "is not available" in text:
                return False
            raise RuntimeError(f"JupyterLab server on port {port} exited with {server.returncode} before "
                               f"answering /api/status: {text[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"JupyterLab server on port {port} did not answer /api/status within "
                               f"{SERVER_START_S} s; log: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def _wait(what: str, check, timeout_s: float, page, shots: Path):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            page.screenshot(path=str(shots / "timeout.png"), full_page=True)
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (screenshot in {shots / 'timeout.png'})")
        page.wait_for_timeout(500)


def _named(what: str, timeout_s: float, step, page=None, shots: Path | None = None):
    """A Playwright step with its own timeout of timeout_s; past it, fail naming what it waited for."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return step()
    except PlaywrightTimeout as exc:
        if page is not None:
            page.screenshot(path=str(shots / "timeout.png"), full_page=True)
        raise TimeoutError(f"{what}: not within {timeout_s:.0f} s" + (f" (screenshot in {shots / 'timeout.png'})"
                                                                       if page is not None else "")) from exc


def test_notebook_02_runs_in_jupyterlab_and_its_slider_moves_the_readout(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    t0 = time.perf_counter()
    with sync_playwright() as pw:
        browser = _named(f"chromium ({CHROMIUM}) to start", BROWSER_START_S,
                         lambda: pw.chromium.launch_persistent_context(
                             str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                             args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
                             timeout=BROWSER_START_S * 1000))
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            _named(f"JupyterLab to show {NOTEBOOK} at {base}", PAGE_LOAD_S, lambda: (
                page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=PAGE_LOAD_S * 1000),
                page.locator(".jp-Notebook .jp-CodeCell").nth(3).wait_for(timeout=PAGE_LOAD_S * 1000)), page, tmp_path)
            # Loaded, and its kernel started: the status bar names the kernel and says it is idle.
            idle = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"Python 3 .*\| Idle")).first
            _named(f"kernel for {NOTEBOOK} to start (status bar 'Python 3 | Idle')", KERNEL_IDLE_S,
                   lambda: idle.wait_for(timeout=KERNEL_IDLE_S * 1000), page, tmp_path)

            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            done = page.locator(".jp-OutputArea-output", has_text="02_clip_ratio_sweep done in")
            errors = page.locator(f".jp-Notebook {STDERR}")
            _wait("all cells run (or one fails)", lambda: done.count() or errors.count(), RUN_ALL_S, page, tmp_path)
            assert errors.count() == 0, f"cells show errors or stderr: {errors.all_inner_texts()[:3]}"

            readout = page.locator(".widget-output .jp-OutputArea-output", has_text="at clip ratio").first
            slider = page.locator(".widget-slider", has_text="clip ratio").first
            before = readout.inner_text()
            plot = page.locator(".widget-output img").first
            plot_before = plot.get_attribute("src")
            assert "at clip ratio 1.000" in before and slider.locator(".widget-readout").inner_text() == "1.00"

            # Drag the handle to the left, as a hand would; the value commits when the mouse is released.
            # A press inside a cell makes it the active one, and JupyterLab then scrolls it into view, under
            # the pointer: select the cell first (a click on its readout) and let the scrolling end.
            readout.click()
            page.wait_for_timeout(1000)
            # hover() waits until the handle is stable and is what the pointer hits, and leaves the mouse there.
            handle = slider.locator(".noUi-handle").first
            handle.hover()
            box = handle.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.down()
            page.mouse.move(x - 60, y, steps=6)
            page.mouse.up()
            value = _wait("the slider to move", lambda: (v := slider.locator(".widget-readout").inner_text()) != "1.00"
                          and v, 10, page, tmp_path)
            assert 0.5 <= float(value) < 1.0, value
            after = _wait("the readout to follow the slider",
                          lambda: (t := readout.inner_text()) != before and f"at clip ratio {float(value):.3f}" in t and t,
                          60, page, tmp_path)
            assert "int4 path within its bound of the dequantized reference" in after, after
            _wait("the plot to follow the slider", lambda: plot.get_attribute("src") not in (None, plot_before),
                  30, page, tmp_path)
            assert "SMOKE" in page.locator(".jp-Notebook").inner_text()  # the smoke notice is on the page
            assert errors.count() == 0, f"moving the slider left errors: {errors.all_inner_texts()[:3]}"
            page.screenshot(path=str(tmp_path / "after.png"))
        finally:
            browser.close()
    print(f"JupyterLab + chromium: slider 1.00 -> {value}, {time.perf_counter() - t0:.1f} s in the browser")
