"""What a learner sees from the checks: the rendered failure (message only, the learner's own
frames when their code raised), progressive hints that never hold solution code, and stubs."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from minigen.course import builder
from minigen.course.checks import CheckFailed
from minigen.course.checks import l00, l01

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
COURSE = str(ROOT / "minigen" / "course")


def _render(exc):
    return "\n".join(exc._render_traceback_())


def test_render_is_the_message_only():
    with pytest.raises(CheckFailed) as info:
        l00.to_minus_one_one(lambda x: x.float() / 255)
    text = _render(info.value)
    assert "Exercise 0.1 (to_minus_one_one)" in text and "Likely mistake" in text
    # nothing of the check: no file of minigen/course, no reference code
    assert COURSE not in text and "File " not in text and "127.5 - 1.0" not in text
    assert info.value.learner_traceback is None


def _broken(x):
    y = x.float()
    return y.reshape(7, 7)  # the learner's own bug: a shape that cannot hold the input


def test_render_shows_the_learners_frames_only():
    with pytest.raises(CheckFailed) as info:
        l00.to_minus_one_one(_broken)
    exc = info.value
    text = _render(exc)
    assert "Your code raised an error" in text and "RuntimeError" in text
    assert "test_check_feedback.py" in text and "_broken" in text and "y.reshape(7, 7)" in text
    assert "minigen/course" not in text and "_framework.py" not in text and "l00.py" not in text
    assert "It was called with: (4, 3, 8, 8) uint8" in str(exc)


def test_render_uses_the_proxy_traceback_text():
    """In the grader the learner's code runs in another process: the proxy hands the text over."""
    class FromWorker(ValueError):
        pass

    def fn(x):
        e = FromWorker("bad value")
        e.learner_traceback = 'File "<cell 3>", line 2, in fn\nValueError: bad value\n'
        raise e

    with pytest.raises(CheckFailed) as info:
        l00.to_minus_one_one(fn)
    assert info.value.learner_traceback.startswith('File "<cell 3>"')
    assert '<cell 3>' in _render(info.value)


def test_stub_of_another_exercise_is_named():
    def uses_stub(mu, logvar):
        raise NotImplementedError("Exercise 1.2: gaussian_kl — read section 3")

    with pytest.raises(CheckFailed, match="calls exercise 1.2, which is not done yet"):
        l01.reparameterize(uses_stub)


def test_timeout_is_reported():
    class ProbeTimeout(TimeoutError):
        limit_s = 30

    def slow(x):
        raise ProbeTimeout()

    with pytest.raises(CheckFailed, match="took longer than 30 s"):
        l00.to_minus_one_one(slow)


def test_unexpected_answer_type_names_the_exercise():
    class Weird:  # not a tensor, not None: the check must not crash with its own traceback
        shape = (4, 3, 8, 8)
        dtype = torch.float32

    with pytest.raises(CheckFailed, match=r"Exercise 0\.1"):
        l00.to_minus_one_one(lambda x: Weird())


# ---------------------------------------------------------------------------- hints
def _lessons():
    for path in SOLUTIONS:
        nb = builder.read_notebook(path)
        module = importlib.import_module(f"minigen.course.checks.l{path.stem[:2]}")
        yield path, nb, module


def _solution_lines(nb):
    lines = []
    for cell in nb["cells"]:
        if builder.exercise_of(cell) is None:
            continue
        inside = False
        for line in builder.source_text(cell).split("\n"):
            s = line.strip()
            if s.startswith(builder.BEGIN_SOLUTION):
                inside = True
            elif s.startswith(builder.END_SOLUTION):
                inside = False
            elif inside and s and not s.startswith("#"):
                lines.append(s)
    return lines


API_CALL = re.compile(r"\b(torch|F|nn|math)\.\w+|\bdef |\blambda\b|\w\[[^\]]*:[^\]]*\]")


def looks_like_code(text: str) -> bool:
    """A hint or stub may use math notation, never runnable code: no torch API names, and no
    phrase that compiles as a Python assignment, call or arithmetic expression."""
    if API_CALL.search(text):
        return True
    for fragment in re.split(r"[.;:,]\s+|\s+(?:then|and|plus|or)\s+", text):
        fragment = fragment.strip().rstrip(".")
        if not re.search(r"(?<![<>!=])=(?!=)|\w\(", fragment):  # an assignment or a call
            continue
        try:
            compile(fragment, "<hint>", "exec")
        except SyntaxError:
            continue
        if re.fullmatch(r"[\w\s-]+", fragment):  # words joined by hyphens ("top-k") are prose
            continue
        return True
    return False


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_exercise_has_progressive_hints_without_code(path, capsys):
    nb = builder.read_notebook(path)
    module = importlib.import_module(f"minigen.course.checks.l{path.stem[:2]}")
    numbers = [ex.number for ex in builder.exercises_in(nb)]
    assert sorted(module.HINTS) == sorted(numbers)
    solution = [line for line in _solution_lines(nb) if len(line) > 12]
    for number in numbers:
        levels = module.HINTS[number]
        assert len(levels) == 2 and all(len(text) > 40 for text in levels)
        for text in levels:
            assert not looks_like_code(text), f"hint {number} reads like code: {text!r}"
            for line in solution:
                assert line not in text, f"hint {number} holds a solution line {line!r}"
        module.hint(number)
        first = capsys.readouterr().out
        assert first.startswith(f"Hint 1/2 for exercise {number} (the idea)")
        assert f'check.hint("{number}", 2)' in first
        module.hint(number, 2)
        second = capsys.readouterr().out
        assert second.startswith(f"Hint 2/2 for exercise {number} (the recipe, in words)")
        assert all(len(line) <= 90 for line in (first + second).split("\n"))
    with pytest.raises(ValueError, match="the exercises are"):
        module.hint("9.9")
    with pytest.raises(ValueError, match="hints 1 to 2"):
        module.hint(numbers[0], 3)


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_stubs_name_the_exercise_and_give_nothing_away(path):
    lesson = json.loads((ROOT / "lessons" / path.name).read_text(encoding="utf-8"))
    solution = builder.read_notebook(path)
    cells = {c["id"]: "".join(c["source"]) for c in lesson["cells"]}
    for ex in builder.exercises_in(solution):
        stub = cells[ex.exercise_id]
        ns = {}
        exec("import math, torch, torch.nn as nn\n" + stub, ns)
        messages = re.findall(r"raise NotImplementedError\((.*?)\)\n", stub + "\n", re.S)
        assert messages
        for m in messages:
            text = eval("(" + m + ")")  # the string literal(s) of the stub
            assert text.startswith(f"Exercise {ex.number}: {ex.name} — read ")
            assert f"check.hint('{ex.number}')" in text
            # no formula or API call of the answer
            assert not looks_like_code(text) and "(" not in text.split(" — ", 1)[1].replace("(“", "").replace(
                "check.hint(", "")
        for line in stub.split("\n"):
            assert len(line) <= 90 or "NotImplementedError" not in line
