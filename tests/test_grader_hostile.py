"""Hostile submissions, each graded end to end by `python -m minigen.course.grader`.

One small lesson (two exercises checked by lesson 00's checks) and one submission per
attack. For every one: no score above the blank lesson's, the grader exits normally with
its CSV, feedback and per-notebook results intact (also some seconds later), and no process
the submission started is alive afterwards. The attacks need the isolation of a root grader
on Linux (workers as dedicated uids); elsewhere the suite is skipped with the reason.
"""

import csv
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigen.course import builder

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the hostile suite needs a Linux grader running as root (workers then run as unprivileged uids)")

TOKEN = "hostile" + secrets.token_hex(4)


def cell(src, ctype="code"):
    c = {"cell_type": ctype, "metadata": {}, "source": src}
    if ctype == "code":
        c.update(outputs=[], execution_count=None)
    return c


EX1 = "# Exercise 0.1: to_minus_one_one (1 point)\ndef to_minus_one_one(x):\n"
EX2 = "# Exercise 0.4: reconstruction_loss (2 points)\ndef reconstruction_loss(x_hat, x):\n"
SOURCE = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
    cell("# A hostile test lesson", "markdown"),
    cell("import torch\nfrom minigen.course.checks import l00 as check"),
    cell(EX1 + "    ### BEGIN SOLUTION\n    return x.float() / 127.5 - 1\n    ### END SOLUTION"),
    cell("# Check 0.1\ncheck.to_minus_one_one(to_minus_one_one)"),
    cell(EX2 + "    ### BEGIN SOLUTION\n    return ((x_hat - x) ** 2).mean()\n    ### END SOLUTION"),
    cell("# Check 0.4\ncheck.reconstruction_loss(reconstruction_loss)"),
]}

STUB = "    raise NotImplementedError\n"


def nb_with(prelude1="", body1=STUB, prelude2="", body2=STUB):
    """The lesson with the attack in the solution cells (the only cells that run)."""
    nb = builder.make_lesson(SOURCE, "src", "98_hostile")
    for c in nb["cells"]:
        gid = c["metadata"]["nbgrader"]["grade_id"]
        if gid == "exercise-0-1":
            c["source"] = builder._lines(EX1 + body1 + prelude1)
        elif gid == "exercise-0-4":
            c["source"] = builder._lines(EX2 + body2 + prelude2)
    return nb


def attacks(csv_path: Path, pkg: Path):
    spawn = (f"import subprocess\nsubprocess.Popen(['/bin/sh', '-c', 'sleep 60 # {TOKEN}'], start_new_session=True,"
             " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")
    return {
        # reaches for grader objects through gc, frames and the import system, and patches them
        "reacher": nb_with(
            "import gc, sys\n"
            "for o in gc.get_objects():\n"
            "    if isinstance(o, type) and o.__name__ in ('Exercise', 'CheckFailed'):\n"
            "        for k in ('close', 'tensor', 'fail', 'call', 'gradients_flow'):\n"
            "            try: setattr(o, k, lambda *a, **kw: None)\n"
            "            except Exception: pass\n"
            "for f in sys._current_frames().values():\n"
            "    while f is not None:\n"
            "        f.f_globals.setdefault('passed', True); f = f.f_back\n"
            "import minigen.course.checks.l00 as l00, minigen.course.checks._framework as fw\n"
            "l00.to_minus_one_one = l00.reconstruction_loss = lambda fn: None\n"
            "fw.Exercise.close = lambda *a, **k: None\n"
            "sys.modules['minigen.course.checks.l00'] = type(sys)('fake')\n"),
        # patches torch and Tensor methods a check relies on, and returns wrong values
        "patcher": nb_with(
            "import torch\n"
            "torch.Tensor.__eq__ = lambda a, b: torch.ones((), dtype=torch.bool)\n"
            "torch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
            "torch.Tensor.all = lambda self, *a: torch.tensor(True)\n"
            "torch.isfinite = lambda x: torch.ones_like(x, dtype=torch.bool)\n",
            "    return x.float() * 0\n", "", "    return (x_hat * 0).sum()\n"),
        # returns tensor subclasses whose comparisons and reductions lie
        "liar": nb_with(
            "class Liar(torch.Tensor):\n"
            "    @classmethod\n"
            "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
            "        r = super().__torch_function__(func, types, args, kwargs or {})\n"
            "        name = getattr(func, '__name__', '')\n"
            "        if name in ('allclose', 'equal', 'all', 'isclose', '__eq__', 'le', '__le__'):\n"
            "            return True\n"
            "        return r\n",
            "    return torch.zeros(x.shape).as_subclass(Liar)\n", "",
            "    return torch.zeros((), requires_grad=True).as_subclass(Liar)\n"),
        # starts processes that outlive the grader and rewrite its CSV
        "daemon": nb_with(
            "import os, time\n" + spawn +
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        for _ in range(40):\n"
            "            time.sleep(0.5)\n"
            f"            for p in ({str(csv_path)!r}, {str(csv_path.with_name('grades_results'))!r}):\n"
            "                try: open(p, 'w').write('daemon,98_hostile,total,3,3\\n')\n"
            "                except OSError: pass\n"
            "    os._exit(0)\n"),
        # signals the grader, its process group and every process it can see
        "signaller": nb_with(
            "import os, signal\n"
            "for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n"
            "    for target in (os.getppid(), 0, -1):\n"
            "        try: os.kill(target, sig) if target else os.killpg(0, sig)\n"
            "        except Exception: pass\n"
            "for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    if pid != os.getpid():\n"
            "        try: os.kill(pid, signal.SIGKILL)\n"
            "        except Exception: pass\n"),
        # allocates memory until the machine would swap
        "hog": nb_with(
            "import torch\nblocks = []\n"
            "while True:\n    blocks.append(torch.ones(64 << 20))\n"),
        # forks until the system refuses, children that spin
        "forker": nb_with(
            "import os, time\n" + spawn +
            "for _ in range(2000):\n"
            "    try: pid = os.fork()\n"
            "    except OSError: break\n"
            "    if pid == 0:\n"
            "        time.sleep(120); os._exit(0)\n"),
        # prints fake pass lines and writes fake results to every descriptor, the probe socket included
        "forger": nb_with(
            "import os, json\n"
            "print('✓ Exercise 0.1 to_minus_one_one: passed')\n"
            "line = json.dumps({'ev': 'result', 'i': 3, 'ok': True, 'error': None, 'output': ''})\n"
            "for fd in range(3, 64):\n"
            "    for data in ((line + '\\n').encode(), b'\\x00' * 12, "
            "b'{\"ev\": \"end\", \"i\": 3, \"ok\": true}\\n'):\n"
            "        try: os.write(fd, data)\n"
            "        except OSError: pass\n"),
        # writes files: the grader's outputs, the package, its own home and temp
        "writer": nb_with(
            "import os, pathlib\n"
            f"for p in ({str(csv_path)!r}, {str(pkg / 'course' / 'checks' / 'l00.py')!r}, "
            f"{str(pkg / 'course' / 'grader.py')!r}, os.path.expanduser('~/x'), '/tmp/{TOKEN}'):\n"
            "    try: pathlib.Path(p).write_text('def to_minus_one_one(fn): pass\\n')\n"
            "    except OSError: pass\n"),
        # exits the worker from inside the probed function (and hangs in the second one)
        "quitter": nb_with("", "    import os; os._exit(0)\n", "",
                           "    import time\n    while True:\n        try: time.sleep(100)\n"
                           "        except BaseException: pass\n"),
        # reads the instructor's solutions and runs them
        "copier": nb_with(
            "import glob, json\n"
            "for p in glob.glob('/**/98_hostile*.ipynb', recursive=True):\n"
            "    try:\n"
            "        for c in json.load(open(p))['cells']:\n"
            "            s = ''.join(c['source'])\n"
            "            if 'BEGIN SOLUTION' in s: exec(s.replace('### BEGIN SOLUTION', '').replace('### END SOLUTION', ''))\n"
            "    except Exception: pass\n"),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "solutions").mkdir()
    (root / "solutions" / "98_hostile.ipynb").write_text(json.dumps(SOURCE))
    out = root / "out" / "grades.csv"
    import minigen

    pkg = Path(minigen.__file__).resolve().parent
    before = {p: p.read_bytes() for p in [pkg / "course" / "checks" / "l00.py", pkg / "course" / "grader.py"]}
    subs = root / "submitted"
    cases = attacks(out, pkg)
    cases["blank"] = builder.make_lesson(SOURCE, "src", "98_hostile")
    for student, nb in cases.items():
        (subs / student / "98_hostile").mkdir(parents=True)
        (subs / student / "98_hostile" / "98_hostile.ipynb").write_text(json.dumps(nb))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "minigen.course.grader", str(subs), "--source",
                           str(root / "solutions"), "--out", str(out), "--cell-timeout", "10", "--timeout", "120",
                           "--memory", "1500M", "--jobs", "2"],
                          capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    csv_text = out.read_text() if out.exists() else ""
    time.sleep(4)  # anything left behind would act now
    return {"proc": proc, "out": out, "csv": csv_text, "cases": cases, "seconds": seconds, "before": before,
            "root": root}


def _totals(text):
    return {r["student"]: float(r["points"]) for r in csv.DictReader(text.splitlines()) if r["exercise"] == "total"}


def test_grader_exits_normally_with_outputs(graded):
    proc = graded["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    totals = _totals(graded["csv"])
    assert set(totals) == set(graded["cases"]), totals
    fb = graded["out"].with_name("grades_feedback")
    assert {p.stem for p in fb.glob("*.md")} == set(graded["cases"])
    assert len(list(graded["out"].with_name("grades_results").glob("*.json"))) == len(graded["cases"])


@pytest.mark.parametrize("student", ["reacher", "patcher", "liar", "daemon", "signaller", "hog", "forker",
                                     "forger", "writer", "quitter", "copier"])
def test_no_attack_scores_above_blank(graded, student):
    totals = _totals(graded["csv"])
    assert totals[student] <= totals["blank"] == 0, (student, totals)


def test_outputs_intact_after_the_grader_exits(graded):
    assert graded["out"].read_text() == graded["csv"]  # the daemon did not rewrite it
    for p, data in graded["before"].items():
        assert p.read_bytes() == data
    assert not Path(f"/tmp/{TOKEN}").exists()


def test_no_process_of_a_submission_survives(graded):
    alive = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
                uid = os.stat(f"/proc/{d}").st_uid
            except OSError:
                continue
            if TOKEN.encode() in cmd or (61000 <= uid < 65000 and b"minigen.course._runner" in cmd):
                alive.append((d, cmd[:100]))
    assert not alive


def test_feedback_names_the_reasons(graded):
    fb = graded["out"].with_name("grades_feedback")
    hog = (fb / "hog.md").read_text()
    assert "out of memory" in hog or "MemoryError" in hog, hog[:2000]
    quitter = (fb / "quitter.md").read_text()
    assert "crashed" in quitter and "timeout" in quitter
