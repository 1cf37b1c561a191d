"""lessons/ is exactly what the builder makes from solutions/, and no solution text leaks into it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigen.course import builder

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))

pytestmark = pytest.mark.skipif(not SOLUTIONS, reason="no solutions/ notebooks in this checkout")


def test_lessons_are_up_to_date():
    r = subprocess.run([sys.executable, "-m", "minigen.course.builder", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"lessons/ is stale; run `minigen lessons build`\n{r.stdout}\n{r.stderr}"


def _block_lines(src: str, begin: str, end: str) -> list[str]:
    lines, inside = [], False
    for line in src.split("\n"):
        s = line.strip()
        if s.startswith(begin):
            inside = True
        elif s.startswith(end):
            inside = False
        elif inside and s and not s.startswith("# Read:"):
            lines.append(s)
    return lines


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_no_solution_leaks(path):
    solution = builder.read_notebook(path)
    lesson_path = ROOT / "lessons" / path.name
    lesson = json.loads(lesson_path.read_text(encoding="utf-8"))
    text = lesson_path.read_text(encoding="utf-8")
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    exercises = builder.exercises_in(solution)
    assert exercises, "a lesson needs at least one exercise"
    lesson_cells = {c["id"]: "".join(c["source"]) for c in lesson["cells"]}
    for cell in solution["cells"]:
        src = builder.source_text(cell)
        ex = builder.exercise_of(cell)
        if ex is not None:
            stub = lesson_cells[ex.exercise_id]
            assert "raise NotImplementedError(" in stub
            assert f'"Exercise {ex.number}: {ex.name} — read ' in stub
            assert f"check.hint('{ex.number}')" in stub
            assert max(map(len, stub.split("\n"))) <= 90 or "NotImplementedError" not in max(
                stub.split("\n"), key=len), "a stub line runs off the cell"
            for line in _block_lines(src, builder.BEGIN_SOLUTION, builder.END_SOLUTION):
                if len(line) > 12:  # short lines such as `return x` may legitimately appear elsewhere
                    assert line not in stub, f"solution line leaks into {lesson_path.name}: {line!r}"
        for line in _block_lines(src, builder.BEGIN_HIDDEN, builder.END_HIDDEN):
            assert line not in text, f"hidden test leaks into {lesson_path.name}: {line!r}"
    for c in lesson["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_exercise_has_a_check_and_the_stub_fails_it(path):
    """Run each stub and its check (the exercise cells only need torch and math): 'not done yet'."""
    from minigen.course.checks import CheckFailed

    lesson = json.loads((ROOT / "lessons" / path.name).read_text(encoding="utf-8"))
    cells = {c["id"]: "".join(c["source"]) for c in lesson["cells"]}
    for ex in builder.exercises_in(builder.read_notebook(path)):
        ns = {}
        exec("import math, torch\nfrom minigen.course.checks import l%s as check" % path.stem[:2], ns)
        exec(cells[ex.exercise_id], ns)
        with pytest.raises(CheckFailed, match=f"Exercise {ex.number} \\({ex.name}\\) is not done yet"):
            exec(cells[ex.check_id], ns)
