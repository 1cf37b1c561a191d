"""The batch grader against adversarial submissions, built in tmp_path.

One small source lesson (two exercises, 1 + 2 points, a hidden test, a skip-grading cell
that would hang) and a dozen submissions, graded in one run: each must get exactly the
score its exercise answers deserve, whatever else the notebook does.
"""

import csv
import json
import os
import re

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
EX2 = "# Exercise 0.4: reconstruction_loss (2 points)\ndef reconstruction_loss(x_hat, x):\n"
GOOD1 = "    return x.float() / 127.5 - 1\n"
GOOD2 = "    return ((x_hat - x) ** 2).mean()\n"

SOURCE = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
    cell("# A test lesson", "markdown"),
    cell("import os, torch\nfrom minigen.course.checks import l00 as check"),
    cell(EX1 + "    ### BEGIN SOLUTION\n" + GOOD1 + "    ### END SOLUTION"),
    cell("# Check 0.1\ncheck.to_minus_one_one(to_minus_one_one)\n### BEGIN HIDDEN TESTS\n"
         "assert to_minus_one_one(torch.tensor([255], dtype=torch.uint8)).item() == 1.0\n"
         "### END HIDDEN TESTS"),
    cell(EX2 + "    ### BEGIN SOLUTION\n    # Read: the mean of the squared difference\n" + GOOD2
         + "    ### END SOLUTION"),
    cell("# Check 0.4\ncheck.reconstruction_loss(reconstruction_loss)"),
    cell("import time\ntime.sleep(1000)  # heavy training the grader skips", tags=["skip-grading"]),
]}


def submission(ex1_body, ex2_body=GOOD2, *, edit=None):
    """The generated lesson with the student's answers in the two exercise cells."""
    nb = builder.make_lesson(SOURCE, "src", "99_test")
    for c in nb["cells"]:
        gid = c["metadata"]["nbgrader"]["grade_id"]
        if gid == "exercise-0-1":
            c["source"] = builder._lines(ex1_body if ex1_body.startswith("#") else EX1 + ex1_body)
        elif gid == "exercise-0-4" and ex2_body is not None:
            c["source"] = builder._lines(EX2 + ex2_body)
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


# student -> (notebook, expected points for 0.1, expected points for 0.4)
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
    # prints a fake success line, writes fake results to every fd, writes fake grades files
    "forger": (submission(FORGE + EX1 + STUB1 + "open('grades.csv', 'w').write('forger,99_test,total,3,3\\n')\n"
                          "open('../grades.csv', 'a').write('forger,,total,3,3,\\n')\n"), 0, 2),
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
    # a helper defined in a cell the student added
    "helper": (submission(EX1 + "    return _scale(x)\n", edit=_add_helper_cell), 1, 2),
    # passes the visible check (1e-6 tolerance) but not the exact hidden test
    "eve": (submission(EX1 + "    return x.float() / 127.5 - 1 + (x == 255).float() * 1e-7\n"), 0, 2),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    (root / "solutions" / "99_test.ipynb").write_text(json.dumps(SOURCE))
    subs = root / "submissions"
    for student, (nb, _, _) in CASES.items():
        (subs / student).mkdir(parents=True)
        (subs / student / "99_test.ipynb").write_text(json.dumps(nb))
    (subs / "broken_99_test.ipynb").write_text("{not json")
    sentinel = root / "keep.txt"
    sentinel.write_text("precious")
    cwd = os.getcwd()
    os.chdir(root)  # the deleter empties its working directory: it must not be this one
    try:
        code = grader.main([str(subs), "--source", str(root / "solutions"), "--out", str(root / "grades.csv"),
                            "--cell-timeout", "3", "--timeout", "60", "--jobs", "2"])
    finally:
        os.chdir(cwd)
    assert code == 0
    with open(root / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    return root, rows, sentinel


def _points(rows, student):
    return {r["exercise"]: float(r["points"]) for r in rows if r["student"] == student}


@pytest.mark.parametrize("student", list(CASES))
def test_each_submission_graded_right(graded, student):
    root, rows, _ = graded
    _, p1, p2 = CASES[student]
    pts = _points(rows, student)
    assert pts["0.1 to_minus_one_one"] == p1, (student, pts)
    assert pts["0.4 reconstruction_loss"] == p2, (student, pts)
    assert pts["total"] == p1 + p2


def test_csv_layout_and_unreadable_notebook(graded):
    root, rows, _ = graded
    assert list(rows[0]) == ["student", "lesson", "exercise", "points", "max_points", "status"]
    assert sum(r["exercise"] == "total" for r in rows) == len(CASES) + 1
    assert _points(rows, "broken")["total"] == 0
    assert all(r["max_points"] == "3" for r in rows if r["exercise"] == "total")
    assert [r["points"] for r in rows if r["student"] == "forger" and r["exercise"] == "total"] == ["2"]


def test_feedback_files(graded):
    root, rows, sentinel = graded
    fb = root / "grades_feedback"
    stub = (fb / "stub.md").read_text()
    assert "not done yet" in stub and "0 / 3 points" in stub
    assert "the mean of the squared difference" in stub  # the stub's hint reaches the feedback
    correct = (fb / "correct.md").read_text()
    assert "3 / 3 points" in correct and "Other problems" not in correct
    loop = (fb / "loop.md").read_text()
    assert "did not finish within 3 s" in loop
    assert "0 / 1" in (fb / "unkillable.md").read_text()
    crash = (fb / "crash.md").read_text()
    assert "RuntimeError: boom" in crash
    patcher = (fb / "patcher.md").read_text()
    assert "[0, 1]" in patcher and "L1" in patcher  # the real checks ran and explained
    assert "torch.equal" in patcher  # the replaced torch function was noted and put back
    assert "AssertionError" in (fb / "eve.md").read_text()
    assert "could not be read" in (fb / "broken.md").read_text()
    chatty = (fb / "chatty.md").read_text()
    assert len(chatty) < 20_000
    assert sentinel.read_text() == "precious"  # the deleter only emptied its temporary directory


def test_plan_uses_canonical_checks_and_student_answers():
    src = grader.Source("99_test", builder.annotate(SOURCE, "src", "99_test"),
                        builder.exercises_in(builder.annotate(SOURCE, "src", "99_test")))
    plan = grader.plan_cells(src, submission(EX1 + "    return 42\n", edit=_tamper_check_cell))
    roles = [c["role"] for c in plan]
    assert roles == ["code", "exercise", "check", "exercise", "check"]  # skip-grading cell left out
    assert "return 42" in plan[1]["source"]
    assert "HIDDEN TESTS" in plan[2]["source"] and "check.to_minus_one_one" in plan[2]["source"]
    assert grader.check_aliases(src.nb) == {"check": "minigen.course.checks.l00"}


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
