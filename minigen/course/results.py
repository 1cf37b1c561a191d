"""A grade, and where it is kept: per-notebook result files (resume), the CSV.

`NotebookGrade` holds one notebook's `ExerciseGrade`s and the problems and ignored cells the
feedback lists. While a batch runs, each notebook's grade is written as soon as it is known
to ``OUT_results/`` (`save_result`, atomically, one JSON file a notebook named by
`result_key`), together with a `fingerprint` of the submission, the instructor's notebooks and
the grading options; a rerun of an interrupted batch takes a saved grade whose fingerprint
still matches (`load_result`) and grades only the rest. The CSV (`write_csv`) comes last.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class ExerciseGrade:
    number: str
    name: str
    points: float
    max_points: float
    status: str      # passed | failed | not done | error | timeout | crashed | not run | missing | reference
    message: str = ""
    integrity: str = ""


@dataclass
class NotebookGrade:
    student: str
    lesson: str
    path: Path
    exercises: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # other cells that failed, timed out or crashed
    ignored: list = field(default_factory=list)   # submitted cells that did not run
    seconds: float = 0.0

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> float:
        return sum(e.max_points for e in self.exercises)

    def to_json(self) -> dict:
        return {"student": self.student, "lesson": self.lesson, "path": str(self.path),
                "exercises": [vars(e) for e in self.exercises], "problems": self.problems,
                "ignored": self.ignored, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "NotebookGrade":
        g = cls(d["student"], d["lesson"], Path(d["path"]), problems=list(d["problems"]),
                ignored=list(d.get("ignored", [])), seconds=float(d["seconds"]))
        g.exercises = [ExerciseGrade(**e) for e in d["exercises"]]
        return g



def num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "student"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def result_key(sub) -> str:
    digest = hashlib.sha1(str(sub.path.resolve()).encode()).hexdigest()[:10]
    return f"{safe_name(sub.student)}--{safe_name(sub.lesson or 'unknown')}--{digest}.json"


def fingerprint(sub, source_dir, options: dict) -> str:
    h = hashlib.sha256()
    try:
        h.update(sub.path.read_bytes())
    except OSError:
        h.update(b"unreadable")
    for p in sorted(Path(source_dir).glob("*.ipynb")):
        h.update(p.read_bytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()



def load_result(path: Path, fp: str) -> NotebookGrade | None:
    """The grade saved at `path` if its fingerprint is `fp`, else None (missing, stale, unreadable)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("fingerprint") == fp:
            return NotebookGrade.from_json(saved["grade"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def save_result(path: Path, fp: str, g: NotebookGrade) -> None:
    atomic_write(path, json.dumps({"fingerprint": fp, "grade": g.to_json()}))


def write_csv(out: Path, by_student: dict[str, list[NotebookGrade]]) -> None:
    """One row per exercise, a row for a notebook without exercises, a total row per student."""
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["student", "lesson", "exercise", "points", "max_points", "status", "integrity"])
    for student in sorted(by_student):
        gs = sorted(by_student[student], key=lambda g: (g.lesson, str(g.path)))
        for g in gs:
            for e in g.exercises:
                wr.writerow([student, g.lesson, f"{e.number} {e.name}", num(e.points), num(e.max_points),
                             e.status, e.integrity])
            if not g.exercises:
                wr.writerow([student, g.lesson, "", 0, 0, "error", ""])
        wr.writerow([student, "", "total", num(sum(g.points for g in gs)), num(sum(g.max_points for g in gs)),
                     "", ""])
    atomic_write(out, buf.getvalue())


__all__ = ["ExerciseGrade", "NotebookGrade", "num", "safe_name", "atomic_write", "result_key", "fingerprint",
           "load_result", "save_result", "write_csv"]
