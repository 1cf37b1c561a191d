"""What the grader runs: the instructor's lessons, the submitted notebooks, and the cells planned from both.

- `load_sources`: the instructor's notebooks (solutions/ by default, hidden tests kept),
  annotated by the builder, with the names each binds to check modules (`check_aliases`).
- `collect` and `identify`: which files were submitted, and which student and lesson each
  one is (the notebook's ``minigen.lesson`` metadata, else its file or folder name; nbgrader's
  ``submitted/STUDENT/LESSON/`` layout included).
- `plan_cells`: the instructor's cells with only the student's solution cells swapped in
  (by nbgrader grade_id, or by the ``# Exercise N.M`` header when the metadata was lost);
  malformed metadata is a `MetadataError` naming the cell. Nothing here runs any code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from minigen.course import builder
from minigen.course.check_cells import CheckCellError, parse_check_cell

_CHECK_IMPORT = [
    re.compile(r"^\s*from\s+minigen\.course\.checks\s+import\s+(?P<mod>\w+)(?:\s+as\s+(?P<alias>\w+))?", re.M),
    re.compile(r"^\s*import\s+minigen\.course\.checks\.(?P<mod>\w+)\s+as\s+(?P<alias>\w+)", re.M),
]




@dataclass
class Source:
    """A lesson as the instructor wrote it: annotated cells (solutions and hidden tests kept)."""
    lesson: str
    nb: dict
    exercises: list  # of builder.ExerciseInfo
    aliases: dict = field(default_factory=dict)  # names bound to check modules, e.g. {"check": "...l00"}
    warnings: list = field(default_factory=list)  # check-cell lines that cannot run on the trusted side

    @property
    def max_points(self) -> float:
        return sum(e.points for e in self.exercises)


def load_sources(source_dir) -> dict[str, Source]:
    source_dir = Path(source_dir)
    paths = sorted(source_dir.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no source notebooks (*.ipynb) in {source_dir}; pass --source solutions/ or lessons/")
    sources = {}
    for p in paths:
        nb = builder.annotate(builder.read_notebook(p), str(p), p.stem)
        src = sources[p.stem] = Source(p.stem, nb, builder.exercises_in(nb), check_aliases(nb))
        for cell in nb["cells"]:
            if cell["metadata"]["nbgrader"]["grade"]:
                try:
                    _, skipped = parse_check_cell(builder.source_text(cell), src.aliases)
                except (SyntaxError, CheckCellError) as e:
                    skipped = [str(e)]
                for line in skipped:
                    src.warnings.append(f"{p.stem}, {cell['metadata']['nbgrader']['grade_id']}: "
                                        f"`{line.splitlines()[0][:80]}` is not a check call and is not run "
                                        "when grading (checks run outside the notebook; call a check function)")
    return sources


def check_aliases(nb: dict) -> dict[str, str]:
    """Names the notebook binds to check modules, e.g. {"check": "minigen.course.checks.l00"}."""
    aliases = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = builder.source_text(cell)
        for pattern in _CHECK_IMPORT:
            for m in pattern.finditer(src):
                aliases[m["alias"] or m["mod"]] = f"minigen.course.checks.{m['mod']}"
    return aliases


# ---------------------------------------------------------------------------- submissions
@dataclass
class Submission:
    path: Path
    student: str
    lesson: str | None
    nb: dict | None = None
    problem: str | None = None


def collect(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files


def _str_or_none(x):
    return x if isinstance(x, str) else None


def identify(path: Path, sources: dict[str, Source]) -> Submission:
    """Which student and lesson a file is. Layouts: alice_00_x.ipynb, alice/00_x.ipynb and
    nbgrader's submitted/alice/00_x/00_x.ipynb (the assignment folder named like the lesson)."""
    nb, problem = None, None
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            raise ValueError("not a notebook")
    except (OSError, ValueError) as e:
        nb, problem = None, f"the notebook could not be read ({e})"
    lesson = None
    if nb is not None:
        meta = nb.get("metadata")
        meta = meta.get("minigen") if isinstance(meta, dict) else None
        name = _str_or_none(meta.get("lesson")) if isinstance(meta, dict) else None
        if name in sources:
            lesson = name
    if lesson is None:
        named = [s for s in sources if s in path.name or s == path.parent.name]
        if named:
            lesson = max(named, key=len)
        elif len(sources) == 1:
            lesson = next(iter(sources))
    stem = path.stem
    if lesson and path.parent.name == lesson and path.parent.parent.name:
        student = path.parent.parent.name  # nbgrader: submitted/STUDENT/ASSIGNMENT/notebook.ipynb
    elif lesson and stem == lesson:
        student = path.parent.name
    elif lesson and lesson in stem:
        student = stem.replace(lesson, "").strip("_-. ") or path.parent.name
    else:
        student = stem
    if lesson is None and problem is None:
        problem = f"cannot tell which lesson this is (known: {', '.join(sources)})"
    return Submission(path, student, lesson, nb, problem)


def _grade_id(cell) -> str | None:
    meta = cell.get("metadata") if isinstance(cell, dict) else None
    nbg = meta.get("nbgrader") if isinstance(meta, dict) else None
    return _str_or_none(nbg.get("grade_id")) if isinstance(nbg, dict) else None


def _text(cell) -> str | None:
    src = cell.get("source", "") if isinstance(cell, dict) else None
    if isinstance(src, str):
        return src
    if isinstance(src, list) and all(isinstance(x, str) for x in src):
        return "".join(src)
    return None


class MetadataError(ValueError):
    """A submission's cells or metadata are malformed; the message says which cell."""


def plan_cells(source: Source, student_nb: dict, ignored: list | None = None) -> list[dict]:
    """The cells to run: the instructor's, with only the student's solution cells swapped in.

    A solution cell is taken from the submission by its nbgrader grade_id (or, for a
    notebook that lost its metadata, by its `# Exercise N.M` header). Every other cell runs
    as the instructor wrote it; cells the student added or edited outside the solution
    cells do not run, and are listed in `ignored` (for the feedback).
    """
    canonical = source.nb["cells"]
    known = {c["metadata"]["nbgrader"]["grade_id"]: c for c in canonical}
    solution_ids = {gid for gid, c in known.items() if c["metadata"]["nbgrader"]["solution"]}
    by_number = {ex.number: ex.exercise_id for ex in source.exercises}
    cells_in = student_nb.get("cells")
    if not isinstance(cells_in, list):
        raise MetadataError("the notebook has no list of cells")
    answers: dict[str, dict] = {}
    fallback: dict[str, dict] = {}
    canonical_texts = {builder.source_text(c).strip() for c in canonical}
    canonical_texts |= {builder.strip_hidden_tests(builder.source_text(c)).strip() for c in canonical}
    for k, cell in enumerate(cells_in):
        if not isinstance(cell, dict):
            raise MetadataError(f"cell {k} is not a JSON object")
        meta = cell.get("metadata", {})
        if not isinstance(meta, dict):
            raise MetadataError(f"cell {k}: its metadata is a {type(meta).__name__}, not an object")
        nbg = meta.get("nbgrader")
        if nbg is not None and not isinstance(nbg, dict):
            raise MetadataError(f"cell {k}: its nbgrader metadata is a {type(nbg).__name__}, not an object")
        if isinstance(nbg, dict) and "grade_id" in nbg and not isinstance(nbg["grade_id"], str):
            raise MetadataError(f"cell {k}: its nbgrader grade_id is a {type(nbg['grade_id']).__name__}, "
                                "not a string")
        text = _text(cell)
        if text is None:
            raise MetadataError(f"cell {k}: its source is neither a string nor a list of strings")
        gid = _grade_id(cell)
        first = text.strip().split("\n", 1)[0][:80]
        if gid in solution_ids and cell.get("cell_type") == "code":
            if gid in answers:
                if ignored is not None:
                    ignored.append(f"cell {k} (`{first}`): a second copy of a solution cell")
                continue
            answers[gid] = cell
            continue
        if gid in known:
            original = builder.source_text(known[gid])
            if text.strip() not in (original.strip(), builder.strip_hidden_tests(original).strip()) \
                    and known[gid]["cell_type"] == "code":
                if ignored is not None:
                    ignored.append(f"cell {k} (`{first}`): you edited a read-only cell; the original ran")
            continue
        ex = builder.exercise_of({"cell_type": cell.get("cell_type"), "source": text})
        if ex is not None and by_number.get(ex.number) and gid is None:
            fallback.setdefault(by_number[ex.number], cell)  # metadata lost: matched by the header
            continue
        if cell.get("cell_type") == "code" and text.strip() and text.strip() not in canonical_texts \
                and ignored is not None:
            ignored.append(f"cell {k} (`{first}`): not a solution cell, so it did not run")
    for gid, cell in fallback.items():
        answers.setdefault(gid, cell)

    cells = []

    def add(src, role, grade_id=None):
        cells.append({"i": len(cells), "source": src, "role": role, "grade_id": grade_id})

    for cell in canonical:
        nbg = cell["metadata"]["nbgrader"]
        gid = nbg["grade_id"]
        if cell["cell_type"] != "code" or builder.SKIP_TAG in cell["metadata"].get("tags", []):
            continue
        if nbg["solution"]:
            if gid in answers:
                add(_text(answers[gid]), "exercise", gid)
            else:  # deleted: run the stub, so the check says "not done yet"
                ex = builder.exercise_of(cell)
                add(builder.strip_solution(builder.source_text(cell), ex), "exercise", gid)
        elif nbg["grade"]:
            add(builder.source_text(cell), "check", gid)
        else:
            add(builder.source_text(cell), "code", gid)
    return cells



__all__ = ["Source", "load_sources", "check_aliases", "Submission", "collect", "identify", "MetadataError",
           "plan_cells"]
