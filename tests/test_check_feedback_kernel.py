"""What a learner sees, tested where the learner sees it: lesson 00 run in a real Jupyter
kernel (nbclient) with a stub, a wrong answer and an answer that raises. The error output
must hold the check's message and no frame (no file) of minigen/course."""

import copy
import json
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the lessons extra (nbclient, ipykernel) is not installed")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "lessons" / "00_setup_and_tour.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

WRONG = ('def to_minus_one_one(images):\n'
         '    x = images.float()\n'
         '    return (x - x.min()) / (x.max() - x.min()) * 2 - 1  # the batch\'s own range\n')
RAISES = ('def to_display(x):\n'
          '    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round()\n'
          '    return pixels.to(torch.uint8).reshape(7, 7)  # a bug of the learner\'s own\n')


def _run(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return nb


def _error(cell):
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert len(errors) == 1, cell.outputs
    return errors[0], ANSI.sub("", "\n".join(errors[0].traceback))


def test_lesson_feedback_in_a_real_kernel():
    lesson = json.loads(LESSON.read_text(encoding="utf-8"))
    src = {c["id"]: "".join(c["source"]) for c in lesson["cells"]}
    setup = next(s for s in src.values() if "import l00 as check" in s)
    stub = src["exercise-0-1"]
    cells = [
        "import os; os.environ['MINIGEN_QUICK'] = '1'",
        setup,
        stub, src["check-0-1"],                               # 3: the untouched stub
        WRONG, src["check-0-1"],                              # 5: a wrong answer
        RAISES, src["check-0-2"],                             # 7: the learner's code raises
        "check.hint('0.1')",                                  # 8: a hint
    ]
    nb = _run(cells)
    assert not any(o.output_type == "error" for o in nb.cells[1].outputs), nb.cells[1].outputs

    err, text = _error(nb.cells[3])
    assert err.ename == "CheckFailed"
    assert "Exercise 0.1 (to_minus_one_one) is not done yet" in text
    assert "minigen/course" not in text and "File " not in text

    err, text = _error(nb.cells[5])
    assert "Exercise 0.1 (to_minus_one_one)" in text
    assert "Likely mistake: you scaled by this batch's own min and max" in text
    # nothing of the check: no path, no source line of it, no reference code
    assert "minigen/course" not in text and "_framework" not in text and "l00.py" not in text
    assert "127.5" not in text and "reference" not in text
    assert len(text.split("\n")) <= 4, text

    err, text = _error(nb.cells[7])
    assert "Exercise 0.2 (to_display): your function raised RuntimeError" in text
    assert "Your code raised an error (your frames only)" in text
    assert "reshape(7, 7)" in text and "in to_display" in text  # the learner's own line
    assert "minigen/course" not in text and "_framework" not in text and "l00.py" not in text

    hint = "".join(o.get("text", "") for o in nb.cells[8].outputs)
    assert hint.startswith("Hint 1/2 for exercise 0.1") and 'check.hint("0.1", 2)' in hint
