"""The lessons builder (solutions/ -> lessons/) and the run-size budget."""

import json
import re
import subprocess
import sys

import pytest

from minigen.course import budget, builder, is_quick


def cell(src, ctype="code", tags=None, outputs=None):
    c = {"cell_type": ctype, "metadata": {"collapsed": False}, "source": src}
    if tags:
        c["metadata"]["tags"] = tags
    if ctype == "code":
        c.update(outputs=outputs or [], execution_count=7 if outputs else None)
    return c


OUT = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]

SOURCE = {"nbformat": 4, "nbformat_minor": 4,
          "metadata": {"language_info": {"name": "python", "version": "3.11.7"}, "widgets": {}},
          "cells": [
              cell("# Lesson 9\n\nSome **teaching**.", "markdown"),
              cell("import torch\nfrom minigen.course.checks import l09 as check", outputs=OUT),
              cell("# Exercise 9.1: scale (2 points)\n"
                   "class Scaler:\n"
                   "    def __call__(self, x):\n"
                   "        ### BEGIN SOLUTION\n"
                   "        # Read: section 2 (“Scaling”)\n"
                   "        # Hint: multiply by two\n"
                   "        y = x * 2\n"
                   "        return y\n"
                   "        ### END SOLUTION\n"
                   "\n"
                   "def helper():\n"
                   "    ### BEGIN SOLUTION\n"
                   "    return 'secret-helper'\n"
                   "    ### END SOLUTION", outputs=OUT),
              cell("# Check 9.1\ncheck.scale(Scaler())\n### BEGIN HIDDEN TESTS\nassert Scaler()(1) == 2  # hidden-marker\n"
                   "### END HIDDEN TESTS", tags=["nbval-check-output"], outputs=OUT),
              cell("train_for_a_long_time()", tags=["skip-grading"]),
              cell("print('same')"),
              cell("print('same')"),
              cell("# Exercise 9.2: shift (0.5 points)\ndef shift(x):\n    ### BEGIN SOLUTION\n    return x + 1\n"
                   "    ### END SOLUTION"),
              cell("# Check 9.2\ncheck.shift(shift)"),
          ]}

NBGRADER_V3_KEYS = {"schema_version", "grade", "locked", "solution", "task", "grade_id", "points",
                    "checksum", "cell_type"}


def validate_nbgrader_v3(nb):
    """The rules of nbgrader's metadata schema v3 (nbgraderformat/v3.json and its validator)."""
    ids = set()
    for c in nb["cells"]:
        meta = c["metadata"]["nbgrader"]
        assert set(meta) <= NBGRADER_V3_KEYS
        assert {"schema_version", "grade", "locked", "solution"} <= set(meta)
        assert meta["schema_version"] == 3
        assert all(isinstance(meta[k], bool) for k in ("grade", "locked", "solution", "task"))
        if meta["grade"] or meta["solution"] or meta["locked"]:
            assert re.fullmatch(r"[a-zA-Z0-9_\-]+", meta["grade_id"])
            assert meta["grade_id"] not in ids
            ids.add(meta["grade_id"])
        if meta["grade"]:
            assert isinstance(meta["points"], (int, float)) and meta["points"] >= 0
        if c["cell_type"] == "markdown":
            assert meta["grade"] == meta["solution"]
        assert not meta["task"]


def lesson():
    return builder.make_lesson(SOURCE, "09_test.ipynb", "09_test")


def by_id(nb, gid):
    return next(c for c in nb["cells"] if c["metadata"]["nbgrader"]["grade_id"] == gid)


STUB_91 = ("Exercise 9.1: scale — read section 2 (“Scaling”); for a hint run check.hint('9.1')")


def test_stub_replaces_solution_at_its_indentation():
    src = "".join(by_id(lesson(), "exercise-9-1")["source"])
    assert "multiply by two" not in src, "a solution comment (the old # Hint) leaked into the stub"
    assert "y = x * 2" not in src and "secret-helper" not in src and "BEGIN SOLUTION" not in src
    assert ("    def __call__(self, x):\n        # YOUR CODE HERE\n"
            "        raise NotImplementedError(\n") in src
    # every block of the exercise gets the same message: which exercise, where to read, how to get a hint
    assert "def helper():\n    # YOUR CODE HERE\n    raise NotImplementedError(" in src
    assert max(len(line) for line in src.split("\n")) <= builder.STUB_WIDTH
    ns = {}
    exec(src, ns)
    with pytest.raises(NotImplementedError) as info:
        ns["Scaler"]()(3)
    assert str(info.value) == STUB_91
    with pytest.raises(NotImplementedError) as info:
        ns["helper"]()
    assert str(info.value) == STUB_91


def test_stub_without_read_line_and_wrapping():
    ex = builder.ExerciseInfo("9.2", "shift", 1)
    assert "the text above explains it" in builder.stub_message(ex, None)
    message = builder.stub_message(ex, "section 7 (“" + "a very long title " * 6 + "”)")
    for indent in ("", "    ", " " * 12):
        lines = builder.stub_lines(indent, message, width=60)
        assert all(len(line) <= 60 for line in lines), lines
        ns = {}
        with pytest.raises(NotImplementedError) as info:
            exec("\n".join(["if True:"] + ["    " + line for line in lines]), ns)
        assert str(info.value) == message
    assert builder.stub_lines("    ", "short") == ['    raise NotImplementedError("short")']


def test_hidden_tests_outputs_and_metadata_removed():
    nb = lesson()
    text = builder.dumps(nb)
    assert "hidden-marker" not in text and "HIDDEN TESTS" not in text
    assert "hello" not in text and "3.11.7" not in text and "widgets" not in text and "collapsed" not in text
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
    assert "".join(by_id(nb, "check-9-1")["source"]) == "# Check 9.1\ncheck.scale(Scaler())"
    assert "tags" not in by_id(nb, "check-9-1")["metadata"]  # nbval markers are for solutions/ only
    assert nb["metadata"]["minigen"] == {"lesson": "09_test"}
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)


def test_nbgrader_metadata():
    nb = lesson()
    validate_nbgrader_v3(nb)
    ex = by_id(nb, "exercise-9-1")["metadata"]
    assert ex["nbgrader"] == {"schema_version": 3, "grade_id": "exercise-9-1", "grade": False,
                              "solution": True, "locked": False, "task": False}
    assert "editable" not in ex
    ck = by_id(nb, "check-9-1")["metadata"]
    assert ck["nbgrader"] == {"schema_version": 3, "grade_id": "check-9-1", "grade": True, "solution": False,
                              "locked": True, "task": False, "points": 2}
    assert ck["editable"] is False and ck["deletable"] is False
    assert by_id(nb, "check-9-2")["metadata"]["nbgrader"]["points"] == 0.5
    others = [c for c in nb["cells"] if not c["id"].startswith(("exercise", "check"))]
    assert len(others) == 5
    for c in others:
        assert c["metadata"]["nbgrader"]["locked"] and not c["metadata"]["nbgrader"]["grade"]
    skip = next(c for c in nb["cells"] if "train_for" in "".join(c["source"]))
    assert skip["metadata"]["tags"] == ["skip-grading"]


def test_valid_nbformat_and_unique_ids():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.reads(builder.dumps(lesson()), as_version=4)
    nbformat.validate(nb)
    ids = [c["id"] for c in nb.cells]
    assert len(set(ids)) == len(ids)
    nbformat.validate(nbformat.reads(builder.dumps(builder.annotate(SOURCE, "x", "x")), as_version=4))


def test_deterministic_and_check_mode(tmp_path):
    sol, les = tmp_path / "solutions", tmp_path / "lessons"
    sol.mkdir()
    (sol / "09_test.ipynb").write_text(json.dumps(SOURCE))
    assert builder.main(["--solutions", str(sol), "--lessons", str(les)]) == 0
    first = (les / "09_test.ipynb").read_bytes()
    assert first.endswith(b"}\n")
    assert builder.main(["build", "--solutions", str(sol), "--lessons", str(les)]) == 0
    assert (les / "09_test.ipynb").read_bytes() == first
    assert builder.main(["--check", "--solutions", str(sol), "--lessons", str(les)]) == 0
    changed = json.loads(json.dumps(SOURCE))
    changed["cells"][0]["source"] = "# Lesson 9, edited"
    (sol / "09_test.ipynb").write_text(json.dumps(changed))
    assert builder.main(["--check", "--solutions", str(sol), "--lessons", str(les)]) == 1
    assert (les / "09_test.ipynb").read_bytes() == first  # --check writes nothing
    # an executed solutions notebook (new outputs, counts) builds the same lesson
    executed = json.loads(json.dumps(SOURCE))
    executed["cells"][7]["outputs"] = OUT
    executed["cells"][7]["execution_count"] = 3
    (sol / "09_test.ipynb").write_text(json.dumps(executed))
    assert builder.main(["--check", "--solutions", str(sol), "--lessons", str(les)]) == 0
    (les / "99_orphan.ipynb").write_text("{}")
    assert builder.main(["--check", "--solutions", str(sol), "--lessons", str(les)]) == 1


def test_nbgrader_export(tmp_path):
    sol = tmp_path / "solutions"
    sol.mkdir()
    (sol / "09_test.ipynb").write_text(json.dumps(SOURCE))
    assert builder.main(["--solutions", str(sol), "--lessons", str(tmp_path / "l"),
                         "--nbgrader", str(tmp_path / "course")]) == 0
    nb = json.loads((tmp_path / "course" / "source" / "09_test" / "09_test.ipynb").read_text())
    validate_nbgrader_v3(nb)
    text = json.dumps(nb)
    assert "### BEGIN SOLUTION" in text and "hidden-marker" in text and "hello" not in text


@pytest.mark.parametrize("cells, message", [
    ([cell("# Exercise 1.1: f (1 point)\ndef f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION")],
     "no '# Check N.M' cell"),
    ([cell("# Check 1.1\ncheck.f(f)")], "comes before"),
    ([cell("# Exercise 1.1: f (1 point)\ndef f():\n    ### BEGIN SOLUTION\n    pass"), cell("# Check 1.1")],
     "no matching"),
    ([cell("def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION")], "outside an exercise cell"),
    ([cell("# Exercise 1.1: f (1 point)\ndef f():\n    pass"), cell("# Check 1.1")], "has no '### BEGIN SOLUTION'"),
    ([cell("# Exercise 1.1: f (1 point)\n### BEGIN SOLUTION\n### END SOLUTION"), cell("# Check 1.1"),
      cell("# Check 1.1")], "second check cell"),
])
def test_authoring_errors(cells, message):
    with pytest.raises(builder.NotebookError, match=re.escape(message)):
        builder.make_lesson({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}, "nb")


def test_cli_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        builder.main(["--help"])
    assert e.value.code == 0 and "--check" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        builder.main(["--no-such-option"])
    assert e.value.code == 2


def test_module_entry_point(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "09_test.ipynb").write_text(json.dumps(SOURCE))
    r = subprocess.run([sys.executable, "-m", "minigen.course.builder", "--check"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stdout


# ---------------------------------------------------------------------------- budget
def test_budget(monkeypatch):
    monkeypatch.setenv("MINIGEN_QUICK", "1")
    assert is_quick() and budget(1000, quick=10, gpu=5000) == 10 and budget(1000) == 1000
    monkeypatch.setenv("MINIGEN_QUICK", "0")
    assert not is_quick()
    monkeypatch.setattr("minigen.course._has_gpu", lambda: True)
    assert budget(1000, quick=10, gpu=5000) == 5000 and budget(1000, quick=10) == 1000
    monkeypatch.setattr("minigen.course._has_gpu", lambda: False)
    assert budget(1000, quick=10, gpu=5000) == 1000
    monkeypatch.delenv("MINIGEN_QUICK")
    assert not is_quick()
    monkeypatch.setenv("MINIGEN_QUICK", "maybe")
    with pytest.raises(ValueError, match="MINIGEN_QUICK"):
        budget(1)
