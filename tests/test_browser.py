"""Notebook 02 as a researcher meets it: JupyterLab in headless Chromium, every cell run, the slider live.

The test starts its own JupyterLab (127.0.0.1, a free port, a token of its own, no browser, config,
data, runtime and settings folders under tmp) on a copy of ``notebooks/02_clip_ratio_sweep.ipynb``
with ``smoke=True`` injected the way papermill does, and drives Debian's ``chromium`` through
Playwright's Python client (never ``playwright install``: the system browser is enough). It runs
all cells from the Run menu, drags the clip-ratio slider, and asserts that the readout and the plot
follow and that no cell shows an error or a stderr block. Where chromium is missing the test is skipped.
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
RUN_ALL_S = 420  # all of notebook 02 at smoke size: about 20 s alone, several times that beside other tests
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'  # how JupyterLab renders tracebacks and stderr

# Its own xdist group: the kernel and the browser need both cores, as the notebook runs do.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("notebooks")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(dest: Path) -> Path:
    """The notebook with smoke=True and one thread, injected after the parameters cell as papermill does."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / NOTEBOOK)), {"smoke": True, "threads": 1})
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
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),  # CI is root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"jupyterlab exited with {server.returncode}: "
                                   f"{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyterlab did not answer on {base} within {SERVER_START_S} s")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


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


def test_notebook_02_runs_in_jupyterlab_and_its_slider_moves_the_readout(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    t0 = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            # Loaded, and its kernel started: the status bar names the kernel and says it is idle.
            page.locator(".jp-Notebook .jp-CodeCell").nth(3).wait_for()
            page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"Python 3 .*\| Idle")).first.wait_for(
                timeout=120_000)

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
