"""Build the exercise notebooks in lessons/ from the solved notebooks in solutions/.

solutions/NN_topic.ipynb is the single source, edited by hand. A cell is an exercise when
its first line reads

    # Exercise 1.1: reparameterize (2 points)

and the check of that exercise is the code cell whose first line reads `# Check 1.1`.
The builder (nbgrader style):

- replaces each `### BEGIN SOLUTION` ... `### END SOLUTION` block by
  `# YOUR CODE HERE` + `raise NotImplementedError("Exercise 1.1: reparameterize — read ...")`
  at the block's indentation. The stub names the exercise, where to read (the first
  `# Read: ...` comment in the exercise cell's solution blocks) and how to ask for a hint
  (`check.hint("1.1")`, kept in the lesson's check module); it gives no part of the answer,
  and is wrapped so no line is longer than STUB_WIDTH characters;
- removes `### BEGIN HIDDEN TESTS` ... `### END HIDDEN TESTS` blocks;
- clears outputs and execution counts;
- writes nbgrader cell metadata (schema_version 3): exercise cells are "autograded answer"
  cells (solution), check cells "autograder tests" cells (grade, locked, with the points),
  every other cell a read-only cell (locked);
- writes the notebook deterministically (sorted keys, indent 1, newline at the end, cell
  ids derived from the content), so rebuilding an unchanged source changes no byte.

    python -m minigen.course.builder            # solutions/ -> lessons/
    python -m minigen.course.builder --check    # exit 1 if lessons/ is out of date
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

NBGRADER_SCHEMA = 3
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
SKIP_TAG = "skip-grading"  # cells the grader does not run (long training, plots)

EXERCISE_RE = re.compile(
    r"^#\s*Exercise\s+(?P<number>\d+\.\d+)\s*:\s*(?P<name>[A-Za-z_]\w*)\s*"
    r"\(\s*(?P<points>\d+(?:\.\d+)?)\s*points?\s*\)\s*$"
)
CHECK_RE = re.compile(r"^#\s*Check\s+(?P<number>\d+\.\d+)\b")
READ_RE = re.compile(r"^\s*#\s*Read:\s*(?P<where>.+?)\s*$")
STUB_WIDTH = 88  # longest stub line: fits a JupyterLab cell at its default width


class NotebookError(ValueError):
    """A solutions notebook breaks the authoring conventions; the message says where."""


@dataclass
class ExerciseInfo:
    number: str
    name: str
    points: float

    @property
    def exercise_id(self) -> str:
        return "exercise-" + self.number.replace(".", "-")

    @property
    def check_id(self) -> str:
        return "check-" + self.number.replace(".", "-")


# ---------------------------------------------------------------------------- reading
def source_text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def read_notebook(path) -> dict:
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise NotebookError(f"{path}: cannot read the notebook ({e})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or nb.get("nbformat") != 4:
        raise NotebookError(f"{path}: not an nbformat-4 notebook")
    return nb


def exercise_of(cell: dict) -> ExerciseInfo | None:
    if cell.get("cell_type") != "code":
        return None
    first = source_text(cell).lstrip("\n").split("\n", 1)[0]
    m = EXERCISE_RE.match(first.strip())
    if not m:
        return None
    pts = float(m["points"])
    return ExerciseInfo(m["number"], m["name"], int(pts) if pts.is_integer() else pts)


def check_number_of(cell: dict) -> str | None:
    if cell.get("cell_type") != "code":
        return None
    first = source_text(cell).lstrip("\n").split("\n", 1)[0]
    m = CHECK_RE.match(first.strip())
    return m["number"] if m else None


# ---------------------------------------------------------------------------- transforming source
def _replace_blocks(src: str, begin: str, end: str, replacement, where: str) -> str:
    """Replace each begin...end block (delimiter lines included) by replacement(indent, block_lines)."""
    lines = src.split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith(begin):
            indent = line[: len(line) - len(line.lstrip())]
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(end):
                if lines[j].strip().startswith(begin):
                    raise NotebookError(f"{where}: nested '{begin}' (line {j + 1})")
                j += 1
            if j == len(lines):
                raise NotebookError(f"{where}: '{begin}' on line {i + 1} has no matching '{end}'")
            out.extend(replacement(indent, lines[i + 1:j]))
            i = j + 1
        else:
            if line.strip().startswith(end):
                raise NotebookError(f"{where}: '{end}' on line {i + 1} without '{begin}'")
            out.append(line)
            i += 1
    return "\n".join(out)


def stub_message(ex: ExerciseInfo, where: str | None) -> str:
    """The stub's text: the exercise, where to read, how to get a hint; never the answer."""
    read = f"read {where}" if where else "the text above explains it"
    return f"Exercise {ex.number}: {ex.name} — {read}; for a hint run check.hint('{ex.number}')"


def stub_lines(indent: str, message: str, width: int = STUB_WIDTH) -> list[str]:
    """`raise NotImplementedError(message)` at `indent`, split into implicitly joined string
    pieces when one line would be longer than `width`."""
    one = f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})"
    if len(one) <= width:
        return [one]
    inner = indent + "    "
    room = max(20, width - len(inner) - 3)  # the quotes and a trailing space or ")"
    pieces, current = [], ""
    # break after "; " where possible (one clause per line), else between words
    for clause in re.split(r"(?<=; )", message):
        for word in ([clause] if len(clause) + 1 <= room else re.split(r"(?<= )", clause)):
            if current and len(current + word) + 1 > room:
                pieces.append(current)
                current = ""
            current += word
    pieces.append(current)
    body = [f"{inner}{json.dumps(piece, ensure_ascii=False)}" for piece in pieces]
    body[-1] += ")"
    return [f"{indent}raise NotImplementedError("] + body


def strip_solution(src: str, ex: ExerciseInfo, where: str = "cell") -> str:
    """Replace the solution blocks of an exercise cell by a stub that names the exercise.

    The stub says where to read (the cell's first `# Read: ...` comment inside a solution
    block); every other line of a solution block, comments included, is dropped.
    """
    read = None
    inside = False
    for line in src.split("\n"):
        stripped = line.strip()
        if stripped.startswith(BEGIN_SOLUTION):
            inside = True
        elif stripped.startswith(END_SOLUTION):
            inside = False
        elif inside and read is None and READ_RE.match(line):
            read = READ_RE.match(line)["where"]
    message = stub_message(ex, read)

    def stub(indent, block):
        return [f"{indent}# YOUR CODE HERE"] + stub_lines(indent, message)

    return _replace_blocks(src, BEGIN_SOLUTION, END_SOLUTION, stub, where)


def strip_hidden_tests(src: str, where: str = "cell") -> str:
    return _replace_blocks(src, BEGIN_HIDDEN, END_HIDDEN, lambda indent, block: [], where).rstrip("\n")


# ---------------------------------------------------------------------------- annotating
def _nbgrader(grade_id: str, *, grade=False, solution=False, locked=False, points=None) -> dict:
    meta = {"schema_version": NBGRADER_SCHEMA, "grade_id": grade_id, "grade": grade,
            "solution": solution, "locked": locked, "task": False}
    if grade:
        meta["points"] = points
    return meta


def _lines(text: str) -> list[str]:
    """Notebook JSON stores text as a list of lines, each ending in newline but the last."""
    return text.splitlines(keepends=True)


def annotate(nb: dict, where: str = "notebook", lesson: str | None = None) -> dict:
    """Return a copy with nbgrader metadata, stable cell ids and clean metadata; solutions kept.

    This is what an instructor's nbgrader `source/` notebook looks like, and what the grader
    takes its canonical check cells (hidden tests included) from.
    """
    nb = copy.deepcopy(nb)
    exercises: dict[str, ExerciseInfo] = {}
    checks: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    cells = []
    for index, cell in enumerate(nb["cells"]):
        ctype = cell.get("cell_type")
        if ctype not in ("code", "markdown", "raw"):
            raise NotebookError(f"{where}: cell {index} has unknown type {ctype!r}")
        src = source_text(cell)
        here = f"{where}, cell {index}"
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if isinstance(t, str)]
        ex = exercise_of(cell)
        number = check_number_of(cell)
        if ex is not None:
            if ex.number in exercises:
                raise NotebookError(f"{here}: exercise {ex.number} is declared twice")
            if BEGIN_SOLUTION not in src:
                raise NotebookError(f"{here}: exercise {ex.number} has no '{BEGIN_SOLUTION}' block")
            exercises[ex.number] = ex
            meta = _nbgrader(ex.exercise_id, solution=True)
            grade_id = ex.exercise_id
        elif number is not None:
            if number not in exercises:
                raise NotebookError(f"{here}: '# Check {number}' comes before (or without) its "
                                    f"'# Exercise {number}: name (N points)' cell")
            if number in checks:
                raise NotebookError(f"{here}: exercise {number} has a second check cell")
            checks[number] = index
            e = exercises[number]
            meta = _nbgrader(e.check_id, grade=True, locked=True, points=e.points)
            grade_id = e.check_id
        else:
            if BEGIN_SOLUTION in src:
                raise NotebookError(f"{here}: a '{BEGIN_SOLUTION}' block outside an exercise cell; "
                                    "start the cell with '# Exercise N.M: name (P points)'")
            if ctype == "code" and BEGIN_HIDDEN in src:
                raise NotebookError(f"{here}: hidden tests belong in a '# Check N.M' cell")
            # read-only cell: id from the content, numbered when the same content repeats
            digest = hashlib.sha1(src.encode("utf-8")).hexdigest()[:8]
            base = f"{ctype[:2]}-{digest}"
            seen_ids[base] = seen_ids.get(base, 0) + 1
            grade_id = base if seen_ids[base] == 1 else f"{base}-{seen_ids[base]}"
            meta = _nbgrader(grade_id, locked=True)
        new_meta = {"nbgrader": meta}
        if tags:
            new_meta["tags"] = tags
        if meta["locked"]:
            # what nbgrader's LockCells does: Jupyter refuses to edit or delete these cells
            new_meta["editable"] = False
            new_meta["deletable"] = False
        new = {"cell_type": ctype, "id": grade_id, "metadata": new_meta, "source": _lines(src)}
        if ctype == "code":
            new["execution_count"] = cell.get("execution_count")
            new["outputs"] = cell.get("outputs", [])
        elif "attachments" in cell:
            new["attachments"] = cell["attachments"]
        cells.append(new)
    missing = sorted(set(exercises) - set(checks))
    if missing:
        raise NotebookError(f"{where}: exercise(s) {', '.join(missing)} have no '# Check N.M' cell")
    nb["cells"] = cells
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "minigen": {"lesson": lesson or Path(where).stem},
    }
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    return nb


def make_lesson(nb: dict, where: str = "notebook", lesson: str | None = None) -> dict:
    """The learner's notebook: annotated, solutions replaced by stubs, hidden tests and outputs removed."""
    nb = annotate(nb, where, lesson)
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        here = f"{where}, cell {index}"
        src = source_text(cell)
        ex = exercise_of(cell)
        if ex is not None:
            src = strip_solution(src, ex, here)
        src = strip_hidden_tests(src, here)
        cell["source"] = _lines(src)
        cell["outputs"] = []
        cell["execution_count"] = None
        tags = [t for t in cell["metadata"].get("tags", []) if not t.startswith("nbval")]
        if tags:
            cell["metadata"]["tags"] = tags
        else:
            cell["metadata"].pop("tags", None)
    return nb


def exercises_in(nb: dict) -> list[ExerciseInfo]:
    return [ex for ex in map(exercise_of, nb["cells"]) if ex is not None]


def dumps(nb: dict) -> str:
    """Deterministic JSON: sorted keys, indent 1 (Jupyter's own layout), newline at the end."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- building
def default_dir(name: str) -> Path:
    """solutions/ or lessons/: in the current repository checkout, next to the package (an
    editable install), or where a regular install puts them (<prefix>/share/minigen/NAME)."""
    here = Path.cwd() / name
    if here.is_dir() or (Path.cwd() / "minigen").is_dir():
        return here
    beside = Path(__file__).resolve().parents[2] / name
    if beside.is_dir():
        return beside
    return Path(sys.prefix) / "share" / "minigen" / name


def build(solutions, lessons, *, check: bool = False, out=sys.stdout) -> int:
    """Write (or with check=True, compare) every lesson. Returns the number of stale files."""
    solutions, lessons = Path(solutions), Path(lessons)
    sources = sorted(p for p in solutions.glob("*.ipynb"))
    if not sources:
        raise NotebookError(f"no notebooks in {solutions}")
    stale = 0
    expected = set()
    for src_path in sources:
        text = dumps(make_lesson(read_notebook(src_path), str(src_path), src_path.stem))
        dest = lessons / src_path.name
        expected.add(dest.name)
        current = dest.read_text(encoding="utf-8") if dest.exists() else None
        if current == text:
            continue
        stale += 1
        if check:
            print(f"stale: {dest} differs from what {src_path} builds", file=out)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".ipynb.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dest)
            print(f"wrote {dest}", file=out)
    if lessons.is_dir():
        for orphan in sorted(set(p.name for p in lessons.glob("*.ipynb")) - expected):
            stale += 1
            print(f"{'stale' if check else 'note'}: {lessons / orphan} has no source in {solutions}", file=out)
    return stale


SKIP_MAGIC = "%%skip_when_grading"


def export_nbgrader(solutions, course_dir, *, out=sys.stdout) -> None:
    """Write course_dir/source/<lesson>/<lesson>.ipynb with nbgrader metadata, for `nbgrader generate_assignment`.

    Cells tagged skip-grading (training runs, plots) start with `%%skip_when_grading`, which
    runs them normally and skips them when MINIGEN_GRADING=1, so `MINIGEN_GRADING=1
    MINIGEN_QUICK=1 nbgrader autograde` runs only what the grade depends on.
    """
    solutions = Path(solutions)
    sources = sorted(solutions.glob("*.ipynb"))
    if not sources:
        raise NotebookError(f"no notebooks in {solutions}")
    for src_path in sources:
        nb = annotate(read_notebook(src_path), str(src_path), src_path.stem)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
                if SKIP_TAG in cell["metadata"].get("tags", []):
                    cell["source"] = _lines(SKIP_MAGIC + "\n" + source_text(cell))
        dest = Path(course_dir) / "source" / src_path.stem / src_path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(dumps(nb), encoding="utf-8")
        print(f"wrote {dest}", file=out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:  # `minigen lessons build ...`
        argv = argv[1:]
    p = argparse.ArgumentParser(
        prog="minigen lessons build",
        description="Generate the exercise notebooks in lessons/ from the solved notebooks in solutions/.")
    p.add_argument("--solutions", type=Path, default=None, help="source folder (default: ./solutions)")
    p.add_argument("--lessons", type=Path, default=None, help="output folder (default: ./lessons)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if lessons/ is out of date")
    p.add_argument("--nbgrader", type=Path, default=None, metavar="COURSE_DIR",
                   help="write only COURSE_DIR/source/<lesson>/<lesson>.ipynb for nbgrader (lessons/ untouched)")
    args = p.parse_args(argv)
    solutions = args.solutions or default_dir("solutions")
    lessons = args.lessons or default_dir("lessons")
    try:
        if args.nbgrader is not None:  # the nbgrader export writes only COURSE_DIR
            if args.check:
                p.error("--check and --nbgrader do not go together")
            export_nbgrader(solutions, args.nbgrader)
            return 0
        stale = build(solutions, lessons, check=args.check)
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if stale:
            print(f"{stale} lesson notebook(s) out of date: run `minigen lessons build`", file=sys.stderr)
            return 1
        print(f"lessons up to date ({lessons})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
