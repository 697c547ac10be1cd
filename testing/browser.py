"""Drive the real ComfyUI frontend in the system's headless Chromium (Selenium), for the browser tests.

The browser is Debian's ``chromium`` with its ``chromium-driver`` (never one a test tool downloads), launched
with a fresh profile and pointed only at the local server::

    with FrontendPage(server.url, profile_dir) as page:
        problems = page.load_workflow(ui_json, "cxr_ablation")
        api = page.graph_to_prompt()

Everything goes through the frontend's own objects (``window.comfyAPI.app.app``: ``loadGraphData``,
``graphToPrompt``, ``queuePrompt``), so what is checked is what a user gets. Selenium is imported only when a
page is opened, so this module imports without it.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The flags the project allows (root needs --no-sandbox). The last two keep the browser local: every host but
# 127.0.0.1 fails to resolve, and no proxy from the environment is used.
LAUNCH_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-proxy-server",
)
# Settings stored on the server before the page opens: no first-run template browser or minimap over the canvas,
# nodes drawn in full detail at any zoom (screenshots of a whole graph), and the load-time checks (schema
# validation, missing nodes and models) explicitly on.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Validation.Workflows": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
}

# Installed before any page script runs: collects uncaught errors, rejected promises and console errors/warnings.
_COLLECT_ERRORS = """
window.__cxrErrors = [];
const keep = (kind, text) => window.__cxrErrors.push(kind + ': ' + text);
addEventListener('error', e => keep('error', e.message + '\\n' + (e.error && e.error.stack)));
addEventListener('unhandledrejection', e => keep('unhandled rejection', String(e.reason?.stack || e.reason)));
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = (...args) => { keep('console.' + level, args.map(String).join(' ')); original(...args); };
}
"""
# What a user would see go wrong: open dialogs (missing nodes/models, errors) and toasts (validation, bad links).
_VISIBLE_PROBLEMS = """
const text = sel => [...document.querySelectorAll(sel)].map(e => e.innerText.trim().slice(0, 800));
return {dialogs: text('.p-dialog'), toasts: text('.p-toast-message'), errors: window.__cxrErrors.splice(0)};
"""
_LOAD = """
const [graph, name, done] = arguments;
const app = window.comfyAPI.app.app;
// As a drop of the file does (app.handleFile): clean the canvas, restore the view, name the tab.
app.loadGraphData(graph, true, true, name).then(() => done(null), e => done(String(e.stack || e)));
"""
_TO_PROMPT = """
const done = arguments[0];
window.comfyAPI.app.app.graphToPrompt().then(p => done(p.output), e => done({__error: String(e.stack || e)}));
"""
_SET_WIDGETS = """
const [values] = arguments;
const app = window.comfyAPI.app.app;
const unknown = [];
for (const [id, widgets] of Object.entries(values)) {
  const node = app.graph.getNodeById(Number(id));
  for (const [name, value] of Object.entries(widgets)) {
    const widget = node && (node.widgets || []).find(w => w.name === name);
    if (!widget) { unknown.push(id + '.' + name); continue; }
    widget.value = value;
    widget.callback?.(value);
  }
}
app.graph.setDirtyCanvas(true, true);
return unknown;
"""
# Listens to the frontend's own api events, then queues through the Run button's code path (app.queuePrompt). Its
# return value is no verdict in this frontend (an accepted prompt's empty node_errors object counts as errors); a
# refused prompt opens an error dialog instead, and an accepted one starts a run.
_QUEUE = """
const done = arguments[0];
const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
window.__cxrRun = {started: null, status: null, detail: null};
const run = window.__cxrRun;
api.addEventListener('execution_start', e => { run.started ??= e.detail.prompt_id; });
for (const status of ['execution_success', 'execution_error', 'execution_interrupted']) {
  api.addEventListener(status, e => { if (e.detail.prompt_id === run.started) { run.status = status;
    run.detail = status === 'execution_success' ? null : JSON.stringify(e.detail).slice(0, 4000); } });
}
app.queuePrompt(0, 1).then(() => done(null), e => done(String(e.stack || e)));
"""
_DIALOGS = "return [...document.querySelectorAll('.p-dialog')].map(e => e.innerText.trim().slice(0, 2000));"
# Fits the canvas around some nodes (all when none given), as the frontend's "fit view" does, and redraws.
_FIT = """
const [ids] = arguments;
const app = window.comfyAPI.app.app;
const nodes = ids ? ids.map(i => app.graph.getNodeById(Number(i))).filter(Boolean) : app.graph.nodes;
const rects = nodes.map(n => n.boundingRect);
const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40], {zoom: 0.98});
app.canvas.setDirty(true, true);
"""
# True once every given node shows its output images, all decoded (so a screenshot has them).
_IMAGES_SHOWN = """
const [ids] = arguments;
const app = window.comfyAPI.app.app;
return ids.every(id => { const n = app.graph.getNodeById(Number(id));
  return n && n.imgs && n.imgs.length && n.imgs.every(img => img.complete && img.naturalWidth > 0); });
"""


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return (f"Chromium and its driver not found at {CHROMIUM} / {CHROMEDRIVER}: "
                "apt-get install chromium chromium-driver")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -r requirements-test.txt"
    return None


class FrontendPage:
    """One headless Chromium showing the ComfyUI frontend of ``url``, with a fresh profile in ``profile_dir``.

    Args:
        url: the server's base address (``http://127.0.0.1:PORT``).
        profile_dir: an empty folder for ``--user-data-dir`` (deleted on :meth:`close`).
        size: window size; large, so a fitted graph stays readable in screenshots.
    """

    def __init__(self, url: str, profile_dir: Path, size: tuple[int, int] = (2800, 1600)):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.url = url
        self.profile_dir = Path(profile_dir)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*LAUNCH_FLAGS, f"--user-data-dir={self.profile_dir}", f"--window-size={size[0]},{size[1]}"):
            options.add_argument(flag)
        with warnings.catch_warnings():  # deprecated for a ClientConfig, which webdriver.Chrome does not take
            warnings.simplefilter("ignore", DeprecationWarning)
            options.ignore_local_proxy_environment_variables()  # talk to chromedriver directly, never via a proxy
        # An explicit driver path: Selenium Manager (which would download one) is never run.
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_script_timeout(120)
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _COLLECT_ERRORS})
        self.startup_errors: list[str] = []
        self.version = ""  # the frontend's own version string, once open

    def __enter__(self) -> FrontendPage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def open(self, timeout: float = 120.0) -> None:
        """(Re)load the app and wait until it is ready; errors raised while it starts go to ``startup_errors``."""
        self.driver.get(self.url + "/")
        deadline = time.monotonic() + timeout
        ready = "const a = window.comfyAPI?.app?.app; return !!(a && a.vueAppReady && a.graph && a.canvas);"
        while not self.driver.execute_script(ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ComfyUI frontend at {self.url} was not ready within {timeout:.0f} s")
            time.sleep(0.25)
        time.sleep(1.0)  # let start-up work that follows readiness (settings, workflow restore) settle
        self.startup_errors = self.problems()["errors"]
        self.version = str(self.driver.execute_script("return window.__COMFYUI_FRONTEND_VERSION__"))

    def problems(self) -> dict[str, list[str]]:
        """Open dialogs, toasts, and the errors collected since the last call (which it clears)."""
        return self.driver.execute_script(_VISIBLE_PROBLEMS)

    def load_workflow(self, graph: Mapping[str, Any], name: str, settle_s: float = 1.0) -> dict[str, list[str]]:
        """Load a UI workflow as a dropped file is loaded; returns :meth:`problems` once the load settled."""
        failure = self.driver.execute_async_script(_LOAD, dict(graph), name)
        time.sleep(settle_s)  # dialogs and toasts open asynchronously after the load returns
        problems = self.problems()
        if failure:
            problems["errors"].append(f"loadGraphData raised: {failure}")
        return problems

    def graph_to_prompt(self) -> dict[str, Any]:
        """The frontend's own API conversion of the current graph (``(await app.graphToPrompt()).output``)."""
        output = self.driver.execute_async_script(_TO_PROMPT)
        if "__error" in output:
            raise RuntimeError(f"graphToPrompt failed: {output['__error']}")
        return output

    def set_widgets(self, values: Mapping[str, Mapping[str, Any]]) -> None:
        """Set widget values by node id and widget name, as typing them in would."""
        unknown = self.driver.execute_script(_SET_WIDGETS, {k: dict(v) for k, v in values.items()})
        if unknown:
            raise KeyError(f"no such widgets in the frontend graph: {unknown}")

    def queue(self, timeout: float = 600.0) -> str:
        """Queue the graph as the Run button does and wait for the end of the run; returns its prompt id.

        Raises:
            RuntimeError: the frontend refused to queue (node errors) or the run failed or was interrupted.
            TimeoutError: the run did not end within ``timeout`` seconds.
        """
        failure = self.driver.execute_async_script(_QUEUE)
        if failure:
            raise RuntimeError(f"app.queuePrompt raised: {failure}")
        deadline = time.monotonic() + timeout
        while True:
            run = self.driver.execute_script("return window.__cxrRun")
            if run["status"] == "execution_success":
                return str(run["started"])
            if run["status"]:
                raise RuntimeError(f"run {run['started']} ended with {run['status']}: {run['detail']}")
            if not run["started"] and (dialogs := self.driver.execute_script(_DIALOGS)):
                raise RuntimeError(f"the frontend did not queue the graph: {dialogs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run['started']} did not end within {timeout:.0f} s")
            time.sleep(0.5)

    def wait_for_images(self, node_ids: list[str], timeout: float = 60.0) -> bool:
        """Wait until the given nodes show their output images on the canvas; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.driver.execute_script(_IMAGES_SHOWN, node_ids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def screenshot(self, path: Path, node_ids: list[str] | None = None) -> Path:
        """Fit the canvas around ``node_ids`` (all nodes when None) and save a PNG of the window."""
        self.driver.execute_script(_FIT, node_ids)
        time.sleep(0.5)  # two animation frames at least, so the canvas is redrawn at the new view
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise RuntimeError(f"Chromium could not save a screenshot to {path}")
        return path
