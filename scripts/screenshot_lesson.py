"""Drive JupyterLab in headless Chromium through a lesson and save screenshots of what a
learner sees: the untouched stub, a wrong answer, a hint, a right answer, an answer that
raises, a training cell.

It checks the learner's view, not the package: a failing check must show its message (and
the learner's own frames), never the check's source. Run it after changing the checks, the
builder's stubs or the feedback rendering, and look at the pictures.

Needs, besides the lessons extra: Debian's chromium and chromium-driver, and Selenium
(not a dependency of minigen):

    apt-get install chromium chromium-driver && pip install selenium

    python scripts/screenshot_lesson.py                       # lesson 00 -> screenshots/00_setup_and_tour/
    python scripts/screenshot_lesson.py --out /tmp/shots --port 8899

JupyterLab runs on a copy of the lesson in a temporary folder, with its own settings,
workspace and runtime folders, in quick mode; nothing in lessons/ or the user's Jupyter
configuration changes. The server and the browser are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LESSON = "00_setup_and_tour"

# the wrong answer of the screenshots: normalises by the batch's own range (a typical mistake)
WRONG_0_1 = '''# Exercise 0.1: to_minus_one_one (1 point)
def to_minus_one_one(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) in {0..255} -> float32 in [-1, 1]."""
    x = images.float()
    return (x - x.min()) / (x.max() - x.min()) * 2 - 1
'''

# an answer that raises: the feedback shows the learner's own frames only
RAISING_0_2 = '''# Exercise 0.2: to_display (2 points)
def to_display(x: torch.Tensor) -> torch.Tensor:
    """float images (..., C, H, W) in [-1, 1] -> uint8 images (..., H, W, C)."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0)  # works for one image only
'''


def solution_source(exercise_id: str) -> str:
    """The solved exercise cell (solutions/ is the single source), markers removed."""
    from minigen.course import builder

    nb = builder.annotate(builder.read_notebook(ROOT / "solutions" / f"{LESSON}.ipynb"))
    src = next("".join(c["source"]) for c in nb["cells"] if c["id"] == exercise_id)
    keep = [line for line in src.split("\n") if line.strip() not in (builder.BEGIN_SOLUTION, builder.END_SOLUTION)
            and not line.strip().startswith("# Read:")]
    return "\n".join(keep)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(served: Path, workdir: Path, port: int, log):
    """JupyterLab on `served`, no token, app exposed as window.jupyterapp, no news popup;
    its settings, workspaces and runtime files in `workdir`."""
    settings = workdir / ".lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, MINIGEN_QUICK="1", MPLBACKEND="module://matplotlib_inline.backend_inline",
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(workdir / ".lab-ws"),
               JUPYTER_RUNTIME_DIR=str(workdir / ".runtime"), JUPYTER_CONFIG_DIR=str(workdir / ".config"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
           f"--ServerApp.root_dir={served}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.disable_check_xsrf=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer on {url} within 60 s; see {log.name}")


def start_browser(profile: Path, width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=opts)


class Lab:
    """A few JupyterLab actions through the exposed app (window.jupyterapp)."""

    def __init__(self, driver):
        self.d = driver

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def wait(self, condition_js, timeout=300, what="JupyterLab"):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(condition_js):
                return
            time.sleep(0.3)
        raise TimeoutError(f"waited {timeout} s for {what}")

    def open_notebook(self, url, name):
        self.d.get(f"{url}/lab/tree/{name}")
        self.wait("return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget "
                  "&& window.jupyterapp.shell.currentWidget.content "
                  "&& window.jupyterapp.shell.currentWidget.content.widgets.length)", what="the notebook")
        self.wait("const s = window.jupyterapp.shell.currentWidget.sessionContext;"
                  "return s.session && s.session.kernel && s.session.kernel.status === 'idle'",
                  what="the kernel")

    def index_of(self, cell_id):
        i = self.js("return window.jupyterapp.shell.currentWidget.content.widgets"
                    ".findIndex(c => c.model.id === arguments[0])", cell_id)
        if i < 0:
            raise KeyError(cell_id)
        return i

    def set_source(self, index, text):
        self.js("window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]]"
                ".model.sharedModel.setSource(arguments[1])", index, text)

    def insert_below(self, index, text):
        self.js("const nb = window.jupyterapp.shell.currentWidget.content;"
                "nb.activeCellIndex = arguments[0];", index)
        self.js("return window.jupyterapp.commands.execute('notebook:insert-cell-below')")
        self.set_source(index + 1, text)
        return index + 1

    def run(self, *indices, timeout=600):
        """Run cells one by one as Shift+Enter would, waiting for each to finish."""
        for i in indices:
            if self.js("return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].model.type",
                       i) != "code":
                self.js("const nb = window.jupyterapp.shell.currentWidget.content;"
                        "nb.activeCellIndex = arguments[0]; nb.deselectAll();", i)
                self.js("return window.jupyterapp.commands.execute('notebook:run-cell')")
                continue
            self.js("const nb = window.jupyterapp.shell.currentWidget.content;"
                    "nb.widgets[arguments[0]].model.executionCount = null;"
                    "nb.activeCellIndex = arguments[0]; nb.deselectAll();", i)
            self.js("return window.jupyterapp.commands.execute('notebook:run-cell')")
            self.wait("const nb = window.jupyterapp.shell.currentWidget;"
                      "const c = nb.content.widgets[arguments[0]];"
                      "return c.model.executionCount !== null && nb.sessionContext.session.kernel.status === 'idle'"
                      .replace("arguments[0]", str(i)), timeout=timeout, what=f"cell {i}")

    def show(self, index, path, *, align="start"):
        """Scroll cell `index` to the top of the notebook panel and save a screenshot."""
        self.js("const nb = window.jupyterapp.shell.currentWidget.content;"
                "nb.activeCellIndex = arguments[0]; nb.deselectAll();"
                "nb.scrollToItem(arguments[0], arguments[1]);", index, align)
        time.sleep(1.0)  # let the outputs render (plots are images)
        self.d.save_screenshot(str(path))
        print(f"saved {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "screenshots" / LESSON,
                   help="folder for the PNG files (default: screenshots/<lesson>/, gitignored)")
    p.add_argument("--port", type=int, default=0, help="JupyterLab's port (default: a free one)")
    p.add_argument("--size", default="1400x1000", help="browser window, WIDTHxHEIGHT")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, notebook)")
    args = p.parse_args(argv)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("error: Selenium is not installed: pip install selenium", file=sys.stderr)
        return 1
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("error: needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)",
              file=sys.stderr)
        return 1
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="minigen-screens-"))
    served = work / "course"  # what JupyterLab shows: the lesson alone
    served.mkdir()
    shutil.copy(ROOT / "lessons" / f"{LESSON}.ipynb", served / f"{LESSON}.ipynb")
    log = open(work / "jupyter.log", "w")
    server = driver = None
    try:
        server, url = start_lab(served, work, args.port or free_port(), log)
        driver = start_browser(work / ".chromium-profile", width, height)
        lab = Lab(driver)
        lab.open_notebook(url, f"{LESSON}.ipynb")
        ex1, check1 = lab.index_of("exercise-0-1"), lab.index_of("check-0-1")

        # 1. the untouched stub: everything up to the first check, as a learner would run it
        lab.run(*range(0, check1 + 1))
        lab.show(ex1, args.out / "1_stub.png")

        # 2. a wrong answer: the check names the mistake, and shows none of its own code
        lab.set_source(ex1, WRONG_0_1)
        lab.run(ex1, check1)
        lab.show(ex1, args.out / "2_wrong_answer.png")

        # 3. the hints, first the idea, then the recipe in words
        h = lab.insert_below(check1, 'check.hint("0.1")\ncheck.hint("0.1", 2)')
        lab.run(h)
        lab.show(check1, args.out / "3_hint.png")

        # 4. the right answer
        lab.set_source(ex1, solution_source("exercise-0-1"))
        lab.run(ex1, check1)
        lab.show(ex1, args.out / "4_right_answer.png")

        # 5. an answer that raises inside the learner's own code
        ex2, check2 = lab.index_of("exercise-0-2"), lab.index_of("check-0-2")
        lab.set_source(ex2, RAISING_0_2)
        lab.run(*range(check1 + 1, check2 + 1))
        lab.show(ex2, args.out / "5_learner_error.png")

        # 6. the rest of the exercises solved, then the training cell and its pictures
        for number in ("0-2", "0-3", "0-4"):
            lab.set_source(lab.index_of(f"exercise-{number}"), solution_source(f"exercise-{number}"))
        train = lab.js("return window.jupyterapp.shell.currentWidget.content.widgets"
                       ".findIndex(c => c.model.sharedModel.getSource().includes('import fit'))")
        lab.run(*range(check1 + 1, train + 2))  # the training cell, then the one that plots its results
        lab.show(train, args.out / "6_training.png")
        lab.show(train + 1, args.out / "7_after_training.png")
    finally:
        if driver is not None:
            driver.quit()
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernel it started
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
