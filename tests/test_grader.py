"""The batch grader against awkward submissions, built in tmp_path.

One small source lesson (three exercises, a hidden test, a skip-grading cell that would
hang) and a dozen submissions in nbgrader's layout, graded in one run: each must get
exactly the score its solution cells deserve, whatever else the notebook does. Only
solution cells run; checks run in the trusted judge (tests/test_probe.py tests the probes,
tests/test_grader_hostile.py the attacks).
"""

import csv
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from minigen.course import builder, grader


def cell(src, ctype="code", tags=None):
    c = {"cell_type": ctype, "metadata": {}, "source": src}
    if tags:
        c["metadata"]["tags"] = tags
    if ctype == "code":
        c.update(outputs=[], execution_count=None)
    return c


EX1 = "# Exercise 0.1: to_minus_one_one (1 point)\ndef to_minus_one_one(x):\n"
EX3 = "# Exercise 1.2: gaussian_kl (1 point)\n"
KL = ("def gaussian_kl(mu, logvar):\n"
      "    ### BEGIN SOLUTION\n    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)\n    ### END SOLUTION")
EX2 = "# Exercise 0.4: reconstruction_loss (2 points)\ndef reconstruction_loss(x_hat, x):\n"
GOOD1 = "    return x.float() / 127.5 - 1\n"
GOOD2 = "    return ((x_hat - x) ** 2).mean()\n"

SOURCE = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
    cell("# A test lesson", "markdown"),
    cell("import os, torch\nfrom minigen.course.checks import l00 as check\n"
         "from minigen.course.checks import l01 as check1"),
    cell(EX1 + "    ### BEGIN SOLUTION\n" + GOOD1 + "    ### END SOLUTION"),
    cell("# Check 0.1\ncheck.to_minus_one_one(to_minus_one_one)\n### BEGIN HIDDEN TESTS\n"
         "check.to_minus_one_one_hidden(to_minus_one_one)\n### END HIDDEN TESTS"),
    cell(EX2 + "    ### BEGIN SOLUTION\n    # Read: the mean of the squared difference\n" + GOOD2
         + "    ### END SOLUTION"),
    cell("# Check 0.4\ncheck.reconstruction_loss(reconstruction_loss)"),
    cell("import time\ntime.sleep(1000)  # heavy training the grader skips", tags=["skip-grading"]),
    cell(EX3 + KL),
    cell("# Check 1.2\ncheck1.gaussian_kl(gaussian_kl)"),
]}


def submission(ex1_body, ex2_body=GOOD2, *, edit=None, kl=None):
    """The generated lesson with the student's answers in the exercise cells (1.2 left a stub)."""
    nb = builder.make_lesson(SOURCE, "src", "99_test")
    for c in nb["cells"]:
        gid = c["metadata"]["nbgrader"]["grade_id"]
        if gid == "exercise-0-1":
            c["source"] = builder._lines(ex1_body if ex1_body.startswith("#") else EX1 + ex1_body)
        elif gid == "exercise-0-4" and ex2_body is not None:
            c["source"] = builder._lines(EX2 + ex2_body)
        elif gid == "exercise-1-2" and kl is not None:
            c["source"] = builder._lines(EX3 + kl)
    if edit:
        edit(nb)
    return nb


STUB1 = "    raise NotImplementedError\n"
UNKILLABLE = ("# ignores KeyboardInterrupt\nwhile True:\n    try:\n        while True:\n            pass\n"
              "    except BaseException:\n        pass\n")
FORGE = ("# forge\nimport os\nprint('✓ Exercise 0.1 to_minus_one_one: passed')\n"
         "for fd in range(3, 64):\n    try:\n"
         "        os.write(fd, b'{\"ev\": \"end\", \"i\": 3, \"ok\": true, \"error\": null, \"output\": \"\"}\\n')\n"
         "    except OSError:\n        pass\n")


def _tamper_check_cell(nb):
    for c in nb["cells"]:
        if c["metadata"]["nbgrader"]["grade_id"] == "check-0-1":
            c["source"] = ["pass"]


def _add_helper_cell(nb):
    i = next(k for k, c in enumerate(nb["cells"]) if c["metadata"]["nbgrader"]["grade_id"] == "exercise-0-1")
    nb["cells"].insert(i, cell("def _scale(x):\n    return x.float() / 127.5 - 1"))


def _tamper_and_delete(nb):
    _tamper_check_cell(nb)
    nb["cells"] = [c for c in nb["cells"] if c["metadata"]["nbgrader"]["grade_id"] != "exercise-0-4"]


def _bad_metadata(nb):
    nb["cells"][2]["metadata"]["nbgrader"]["grade_id"] = ["exercise-0-1"]  # a list where a string belongs


# student -> (notebook, expected points for 0.1, expected points for 0.4[, for 1.2])
CASES = {
    "correct": (submission(GOOD1), 1, 2),
    "stub": (submission(STUB1, None), 0, 0),
    "crash": (submission("# crash\nraise RuntimeError('boom')\n" + EX1 + GOOD1), 0, 2),
    "loop": (submission("# loop\nwhile True:\n    pass\n" + EX1 + GOOD1), 0, 2),
    "unkillable": (submission(UNKILLABLE + EX1 + GOOD1), 0, 2),
    # prints 5 MB through Python and 5 MB straight to fd 1, then empties its directory and ~
    "chatty": (submission(EX1 + GOOD1 + "print('x' * 5_000_000)\nimport os, shutil\nos.write(1, b'y' * 5_000_000)\n"
                          "for f in os.listdir('.'):\n"
                          "    shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)\n"
                          "for f in os.listdir(os.path.expanduser('~')):\n"
                          "    p = os.path.join(os.path.expanduser('~'), f)\n"
                          "    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)\n"), 1, 2),
    # prints a fake success line, writes fake results to every fd (the probe socket too, which
    # breaks its own channel: 0.4 is then refused as well), writes fake grades files
    "forger": (submission(FORGE + EX1 + STUB1 + "open('grades.csv', 'w').write('forger,99_test,total,3,3\\n')\n"
                          "open('../grades.csv', 'a').write('forger,,total,3,3,\\n')\n"), 0, 0),
    # wrong answers, then monkeypatches the check module, the framework and torch (0.1)
    # and rebinds the name `check` to a fake (0.4)
    "patcher": (submission(EX1 + "    return x.float() / 255\n"
                           "check.to_minus_one_one = lambda fn: print('passed')\n"
                           "import minigen.course.checks._framework as fw\n"
                           "fw.Exercise.close = lambda *a, **k: None\n"
                           "import torch\ntorch.equal = lambda *a, **k: True\n",
                           "    return (x_hat - x).abs().mean()\n"
                           "class check:\n    reconstruction_loss = staticmethod(lambda fn: None)\n"), 0, 0),
    # empties the check cell of 0.1 (stub answer) and deletes the exercise cell of 0.4
    "tamperer": (submission(STUB1, edit=_tamper_and_delete), 0, 0),
    # a helper defined in a cell the student added: added cells do not run
    "helper": (submission(EX1 + "    return _scale(x)\n", edit=_add_helper_cell), 0, 2),
    # minigen's own gaussian_kl, imported and aliased: points, but the integrity column says so
    "borrower": (submission(GOOD1, kl="from minigen.vae import gaussian_kl\n"), 1, 2, 1),
    "aliaser": (submission(GOOD1, kl="import minigen.vae as v\ngaussian_kl = v.gaussian_kl\n"), 1, 2, 1),
    # its own gaussian_kl: full marks, clean integrity
    "kl": (submission(GOOD1, kl="def gaussian_kl(mu, logvar):\n"
                                "    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)\n"), 1, 2, 1),
    # malformed metadata: an error row of its own, the batch goes on
    "malformed": (submission(GOOD1, edit=_bad_metadata), 0, 0),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    (root / "solutions" / "99_test.ipynb").write_text(json.dumps(SOURCE))
    subs = root / "submitted"  # nbgrader's layout: submitted/STUDENT/ASSIGNMENT/NOTEBOOK.ipynb
    for student, (nb, *_) in CASES.items():
        (subs / student / "99_test").mkdir(parents=True)
        (subs / student / "99_test" / "99_test.ipynb").write_text(json.dumps(nb))
    (subs / "broken_99_test.ipynb").write_text("{not json")
    # two names that are the same file name once made safe: feedback files must not collide
    (subs / "a b" / "99_test").mkdir(parents=True)
    (subs / "a b" / "99_test" / "99_test.ipynb").write_text(json.dumps(CASES["stub"][0]))
    (subs / "a_b" / "99_test").mkdir(parents=True)
    (subs / "a_b" / "99_test" / "99_test.ipynb").write_text(json.dumps(CASES["correct"][0]))
    sentinel = root / "keep.txt"
    sentinel.write_text("precious")
    cwd = os.getcwd()
    os.chdir(root)  # the deleter empties its working directory: it must not be this one
    try:
        code = grader.main([str(subs), "--source", str(root / "solutions"), "--out", str(root / "grades.csv"),
                            "--cell-timeout", "10", "--timeout", "90", "--jobs", "2"])
    finally:
        os.chdir(cwd)
    assert code == 0
    with open(root / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    return root, rows, sentinel


def _regrade(root, *extra):
    return grader.main([str(root / "submitted"), "--source", str(root / "solutions"), "--out",
                        str(root / "grades.csv"), "--cell-timeout", "10", "--timeout", "90", *extra])


def _points(rows, student):
    return {r["exercise"]: float(r["points"]) for r in rows if r["student"] == student}


@pytest.mark.parametrize("student", list(CASES))
def test_each_submission_graded_right(graded, student):
    root, rows, _ = graded
    _, p1, p2, *p3 = CASES[student]
    p3 = p3[0] if p3 else 0
    pts = _points(rows, student)
    assert pts["0.1 to_minus_one_one"] == p1, (student, pts)
    assert pts["0.4 reconstruction_loss"] == p2, (student, pts)
    assert pts["1.2 gaussian_kl"] == p3, (student, pts)
    assert pts["total"] == p1 + p2 + p3


def test_csv_layout_and_unreadable_notebook(graded):
    root, rows, _ = graded
    assert list(rows[0]) == ["student", "lesson", "exercise", "points", "max_points", "status", "integrity"]
    assert sum(r["exercise"] == "total" for r in rows) == len(CASES) + 3
    assert _points(rows, "broken")["total"] == 0
    assert all(r["max_points"] == "4" for r in rows if r["exercise"] == "total")
    assert [r["points"] for r in rows if r["student"] == "forger" and r["exercise"] == "total"] == ["0"]
    assert {r["status"] for r in rows if r["student"] == "malformed" and r["exercise"] != "total"} == {"error"}
    assert _points(rows, "a b")["total"] == 0 and _points(rows, "a_b")["total"] == 3


def test_integrity_column(graded):
    root, rows, _ = graded
    integ = {r["student"]: r["integrity"] for r in rows if r["exercise"] == "1.2 gaussian_kl"}
    assert "minigen.vae" in integ["borrower"] and "minigen.vae" in integ["aliaser"]
    assert integ["kl"] == "" and integ["correct"] == ""


def test_feedback_files(graded):
    root, rows, sentinel = graded
    fb = root / "grades_feedback"
    stub = (fb / "stub.md").read_text()
    assert "not done yet" in stub and "0 / 4 points" in stub
    assert "the mean of the squared difference" in stub  # the stub's hint reaches the feedback
    correct = (fb / "correct.md").read_text()
    assert "3 / 4 points" in correct and "Other problems" not in correct
    loop = (fb / "loop.md").read_text()
    assert "did not finish within 10 s" in loop
    assert "0 / 1" in (fb / "unkillable.md").read_text()
    crash = (fb / "crash.md").read_text()
    assert "RuntimeError: boom" in crash
    patcher = (fb / "patcher.md").read_text()
    assert "[0, 1]" in patcher and "L1" in patcher  # the real checks ran and explained
    helper = (fb / "helper.md").read_text()
    assert "did not run" in helper and "def _scale" in helper and "NameError" in helper
    assert "grade_id is a list" in (fb / "malformed.md").read_text()
    assert "could not be read" in (fb / "broken.md").read_text()
    assert len(list(fb.glob("a_b-*.md"))) == 2
    chatty = (fb / "chatty.md").read_text()
    assert len(chatty) < 20_000
    assert sentinel.read_text() == "precious"  # the deleter only emptied its temporary directory


def test_rerun_grades_only_what_is_missing(graded, capsys):
    root, rows, _ = graded
    results = root / "grades_results"
    victim = next(results.glob("correct--*.json"))
    victim.unlink()
    assert _regrade(root) == 0
    out = capsys.readouterr().out
    assert out.count("already graded") == len(CASES) + 2  # everything but the deleted result
    assert victim.exists()


def test_forbid_reference(graded, tmp_path):
    root, _, _ = graded
    subs = tmp_path / "submitted" / "borrower" / "99_test"
    subs.mkdir(parents=True)
    (subs / "99_test.ipynb").write_text(json.dumps(CASES["borrower"][0]))
    assert grader.main([str(tmp_path / "submitted"), "--source", str(root / "solutions"), "--out",
                        str(tmp_path / "g.csv"), "--forbid-reference"]) == 0
    with open(tmp_path / "g.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["exercise"] == "1.2 gaussian_kl")
    assert row["points"] == "0" and row["status"] == "reference"
    assert "write it yourself" in (tmp_path / "g_feedback" / "borrower.md").read_text()


def test_plan_uses_canonical_checks_and_student_answers():
    src = grader.Source("99_test", builder.annotate(SOURCE, "src", "99_test"),
                        builder.exercises_in(builder.annotate(SOURCE, "src", "99_test")))
    plan = grader.plan_cells(src, submission(EX1 + "    return 42\n", edit=_tamper_check_cell))
    roles = [c["role"] for c in plan]
    assert roles == ["code", "exercise", "check", "exercise", "check", "exercise", "check"]  # skip-grading left out
    assert "return 42" in plan[1]["source"]
    assert "HIDDEN TESTS" in plan[2]["source"] and "check.to_minus_one_one" in plan[2]["source"]
    assert grader.check_aliases(src.nb) == {"check": "minigen.course.checks.l00", "check1": "minigen.course.checks.l01"}
    ignored = []
    grader.plan_cells(src, submission(GOOD1, edit=_add_helper_cell), ignored)
    assert len(ignored) == 1 and "_scale" in ignored[0]


def test_cli_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        grader.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        grader.main(["x.ipynb", "--out", "g.csv", "--cell-timeout", "-1"])
    assert e.value.code == 2
    assert grader.main([str(tmp_path / "missing.ipynb"), "--out", str(tmp_path / "g.csv"),
                        "--source", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as e:
        grader.main(["--help"])
    assert e.value.code == 0
    assert re.search(r"--cell-timeout", capsys.readouterr().out)


def test_less_isolation_is_said_once_and_grading_still_works(tmp_path, monkeypatch, capsys):
    """Not root and no writable cgroup: workers run as the grader's user under RLIMIT_AS."""
    from minigen.course import sandbox

    root = tmp_path
    (root / "solutions").mkdir()
    (root / "solutions" / "99_test.ipynb").write_text(json.dumps(SOURCE))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_cgroup_root", lambda: None)
    monkeypatch.setattr(sandbox, "_notes", [])
    subs = tmp_path / "submitted" / "solo" / "99_test"
    subs.mkdir(parents=True)
    (subs / "99_test.ipynb").write_text(json.dumps(CASES["correct"][0]))
    assert grader.main([str(tmp_path / "submitted"), "--source", str(root / "solutions"), "--out",
                        str(tmp_path / "g.csv"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: the grader is not root") == 1 and out.count("RLIMIT_AS") == 1
    with open(tmp_path / "g.csv") as f:
        assert next(r for r in csv.DictReader(f) if r["exercise"] == "total")["points"] == "3"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the mount plan is Linux-only")
def test_mount_plan_binds_back_python_and_the_package_when_they_live_in_tmp(tmp_path, monkeypatch):
    # CI makes its virtual environment with `mktemp -d` and may clone into /tmp: the worker's
    # private /tmp must still show them (else every import fails and every answer scores 0),
    # while a hidden folder inside them (the instructor's solutions) stays hidden.
    from minigen.course import sandbox

    tmp_root = os.path.realpath(tempfile.gettempdir())
    clone = Path(tempfile.mkdtemp(dir=tmp_root, prefix="clone-"))
    try:
        (clone / "solutions").mkdir()
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.setattr(sys, "path", [str(clone), *sys.path])
        box = sandbox.Sandbox(slot=0, memory=1 << 30)
        try:
            box.hide = [str(clone / "solutions")]
            box._workdir = str(work)
            _, hide, private = box._mount_plan()
        finally:
            box.close()
        keepers = dict(private)[tmp_root]
        assert str(clone) in keepers, private
        assert os.path.realpath(work) in keepers or any(os.path.realpath(work).startswith(k + "/") for k in keepers)
        assert str(clone / "solutions") in hide, hide
    finally:
        shutil.rmtree(clone, ignore_errors=True)
