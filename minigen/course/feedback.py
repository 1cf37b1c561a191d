"""The Markdown feedback file each student gets: points per exercise, what failed and why.

`feedback_markdown` renders one student's grades (a table per notebook, then each exercise
that did not pass with the judge's message, exercises not checked because an earlier one is
not done, cells of the notebook that did not run, other problems); `write_feedback` writes
one file per student, names that collide on disk kept apart by a hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from minigen.course.results import NotebookGrade, atomic_write, num, safe_name

def feedback_markdown(grades: list[NotebookGrade]) -> str:
    student = grades[0].student
    lines = [f"# Feedback for {student}", ""]
    for g in grades:
        lines += [f"## {g.lesson} ({g.path.name}): {num(g.points)} / {num(g.max_points)} points", "",
                  "| exercise | points | result |", "|---|---|---|"]
        for e in g.exercises:
            lines.append(f"| {e.number} {e.name} | {num(e.points)} / {num(e.max_points)} | {e.status} |")
        lines.append("")
        folded = [e for e in g.exercises if e.message.startswith("not checked: it uses exercise")]
        if folded:
            lines += ["- " + ", ".join(f"{e.number}" for e in folded) + " not checked: "
                      + "; ".join(sorted({e.message.split(': ', 1)[1] for e in folded})), ""]
        for e in g.exercises:
            if e.status != "passed" and e not in folded:
                lines += [f"### Exercise {e.number} {e.name}: {e.status}", ""]
                if e.message:
                    lines += ["```text", e.message.replace("```", "ˋˋˋ"), "```", ""]
            if e.integrity:
                lines += [f"- Exercise {e.number}: uses minigen's own implementation ({e.integrity})", ""]
        if g.ignored:
            lines += ["### Cells that did not run", "",
                      "Only your solution cells are graded; these cells of your notebook were ignored:", ""]
            lines += [f"- {x}" for x in g.ignored] + [""]
        if g.problems:
            lines += ["### Other problems", ""] + [f"- {p}".replace("\n", "\n  ") for p in g.problems] + [""]
    return "\n".join(lines)



def write_feedback(folder: Path, by_student: dict[str, list[NotebookGrade]]) -> None:
    """folder/STUDENT.md for every student, their notebooks in lesson order."""
    folder.mkdir(parents=True, exist_ok=True)
    safe_names: dict[str, list] = {}
    for student in by_student:
        safe_names.setdefault(safe_name(student).lower(), []).append(student)
    for student, gs in by_student.items():
        name = safe_name(student)
        if len(safe_names[name.lower()]) > 1:  # two names that look alike on disk: keep both apart
            name += "-" + hashlib.sha1(student.encode()).hexdigest()[:8]
        atomic_write(folder / f"{name}.md", feedback_markdown(sorted(gs, key=lambda g: (g.lesson, str(g.path)))))


__all__ = ["feedback_markdown", "write_feedback"]
