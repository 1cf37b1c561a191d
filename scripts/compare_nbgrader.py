"""Grade the same submissions with `minigen grade` and with nbgrader's own `autograde`; compare.

    python scripts/compare_nbgrader.py [LESSON ...] [--work DIR]

For each lesson it builds an nbgrader course from `python -m minigen.course.builder
--nbgrader`, releases the assignment, and submits three notebooks: `full` (every solution),
`blank` (the release, stubs only) and `half` (the first exercise solved). nbgrader runs them
as its users do (`MINIGEN_GRADING=1 MINIGEN_QUICK=1 nbgrader autograde`, timed per notebook),
`minigen grade` grades the same files, and the script prints both scores per notebook and
exits 1 on any difference. Needs `pip install nbgrader`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minigen.course import builder  # noqa: E402


def run(cmd, cwd, env=None, timeout=1800):
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p, time.monotonic() - t0


def submissions(source_nb: dict, release_nb: dict) -> dict[str, dict]:
    """full: the source's solution cells in the release; half: only the first; blank: the release."""
    solutions = {c["metadata"]["nbgrader"]["grade_id"]: c["source"] for c in source_nb["cells"]
                 if c["metadata"].get("nbgrader", {}).get("solution")}
    out = {"blank": release_nb}
    for name, keep in (("full", None), ("half", 1)):
        nb = json.loads(json.dumps(release_nb))
        done = 0
        for c in nb["cells"]:
            gid = c["metadata"].get("nbgrader", {}).get("grade_id")
            if gid in solutions and (keep is None or done < keep):
                c["source"] = [line for line in builder._lines(
                    builder.source_text({"source": solutions[gid]}).replace("### BEGIN SOLUTION\n", "")
                    .replace("### END SOLUTION\n", ""))]
                done += 1
        out[name] = nb
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("lessons", nargs="*")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="minigen-nbgrader-"))
    course = work / "course"
    if course.exists():
        shutil.rmtree(course)
    run([sys.executable, "-m", "minigen.course.builder", "--nbgrader", str(course)], cwd=REPO)
    lessons = args.lessons or sorted(p.name for p in (course / "source").iterdir())
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(course)!r}\n"
        "c.CourseDirectory.course_id = 'minigen'\n"
        "c.ExecutePreprocessor.timeout = 600\n"
        "c.Execute.timeout = 600\n")
    env = dict(os.environ, MINIGEN_GRADING="1", MINIGEN_QUICK="1")
    nbg = [sys.executable, "-m", "nbgrader"]
    students = ["full", "half", "blank"]
    for s in students:
        run(nbg + ["db", "student", "add", s], cwd=course)
    times, nb_scores = {}, {}
    for lesson in lessons:
        run(nbg + ["db", "assignment", "add", lesson], cwd=course)
        run(nbg + ["generate_assignment", lesson, "--force"], cwd=course)
        release = json.loads((course / "release" / lesson / f"{lesson}.ipynb").read_text())
        source = json.loads((course / "source" / lesson / f"{lesson}.ipynb").read_text())
        for student, nb in submissions(source, release).items():
            d = course / "submitted" / student / lesson
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{lesson}.ipynb").write_text(json.dumps(nb))
        for student in students:
            _, seconds = run(nbg + ["autograde", lesson, "--student", student, "--force"], cwd=course, env=env)
            times[(student, lesson)] = seconds
            print(f"nbgrader autograde {lesson} {student}: {seconds:.0f} s", flush=True)
    run(nbg + ["export", "--to", str(work / "nbgrader.csv")], cwd=course)
    with open(work / "nbgrader.csv") as f:
        for r in csv.DictReader(f):
            nb_scores[(r["student_id"], r["assignment"])] = float(r["raw_score"] or 0)
    run([sys.executable, "-m", "minigen.course.grader", str(course / "submitted"), "--out",
         str(work / "minigen.csv"), "--jobs", "2"], cwd=REPO, timeout=3600)
    ours = {}
    with open(work / "minigen.csv") as f:
        for r in csv.DictReader(f):
            if r["exercise"] and r["exercise"] != "total":
                ours[(r["student"], r["lesson"])] = ours.get((r["student"], r["lesson"]), 0.0) + float(r["points"])
    bad = 0
    print(f"{'lesson':28s} {'student':6s} {'nbgrader':>8s} {'minigen':>8s} {'autograde s':>11s}")
    for lesson in lessons:
        for s in students:
            a, b = nb_scores.get((s, lesson)), ours.get((s, lesson))
            flag = "" if a == b else "  DIFFERENT"
            bad += bool(flag)
            print(f"{lesson:28s} {s:6s} {a!s:>8s} {b!s:>8s} {times[(s, lesson)]:11.0f}{flag}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
