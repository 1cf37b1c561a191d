"""The solved notebooks' own answers pass every check, hidden tests included.

Only the exercise and check cells run (in order, in one namespace), so this takes seconds,
not the minutes of executing whole notebooks (nbval does that).
"""

import contextlib
import io
from pathlib import Path

import pytest

from minigen.course import builder

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))

pytestmark = pytest.mark.skipif(not SOLUTIONS, reason="no solutions/ notebooks in this checkout")

PRELUDE = ("import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
           "from minigen.course.checks import l{lesson} as check\n")


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solutions_pass_their_checks_and_hidden_tests(path, capsys):
    nb = builder.read_notebook(path)
    ns = {}
    exec(PRELUDE.format(lesson=path.stem[:2]), ns)
    checked = 0
    for cell in nb["cells"]:
        if builder.exercise_of(cell) is not None:
            exec(builder.source_text(cell), ns)
        elif builder.check_number_of(cell) is not None:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(builder.source_text(cell), ns)  # hidden tests included: they are in the source
            checked += 1
            assert printed.getvalue().startswith("✓ Exercise"), printed.getvalue()
            # nbval compares the check cells' saved output: it must be what the check prints now
            saved = "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                            if o.get("output_type") == "stream")
            assert saved == printed.getvalue(), f"saved output of '# Check {builder.check_number_of(cell)}' is stale"
    assert checked == len(builder.exercises_in(nb))
