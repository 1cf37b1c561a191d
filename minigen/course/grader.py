"""Grade a folder of submitted lesson notebooks: a CSV of points and a feedback file per student.

    python -m minigen.course.grader submissions/ --out grades.csv
    minigen grade submissions/*/00_setup_and_tour.ipynb --out grades.csv --jobs 2

How a submission is graded:

- The lesson is found from the notebook's metadata (`minigen.lesson`, written by the
  builder) or its file name; the student's name is the file name without the lesson name
  (`alice_00_setup_and_tour.ipynb`) or, when the file is named like the lesson, its folder
  (`alice/00_setup_and_tour.ipynb`).
- The notebook that runs is the instructor's source notebook (solutions/ by default, hidden
  tests included) with each exercise cell taken from the student (matched by nbgrader
  grade_id) and cells the student added kept in place. Check cells and every other locked
  cell come from the source, so editing them changes nothing. Cells tagged `skip-grading`
  are not run.
- Each notebook runs in its own process (quick mode, MINIGEN_QUICK=1) with an IPython
  shell, in a fresh temporary directory that is then deleted, with a per-cell and a
  per-notebook time limit. A cell over its limit is interrupted; if it does not stop, the
  process group is killed and the notebook is replayed without that cell, so later
  exercises are still graded. A crash in a cell costs only that cell.
- Results come back over an inherited pipe, each line tagged with a random per-run token;
  output is captured into capped buffers. Printing "passed" or writing a grades file forges
  nothing; the check modules are imported afresh before every check cell, and attributes of
  torch/builtins the notebook replaced are put back.

This isolates honest mistakes and casual tampering, not a determined attacker: the code
runs as your user. For untrusted submissions run the grader in a container or as an
unprivileged user.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from minigen.course import builder

GRACE_S = 3.0        # after an interrupt, how long a cell may take to stop before the kill
MAX_RESTARTS = 3     # replays after a killed or crashed cell
LINE_CAP = 4 << 20   # longest result line accepted from the child (bytes)

_CHECK_IMPORT = [
    re.compile(r"^\s*from\s+minigen\.course\.checks\s+import\s+(?P<mod>\w+)(?:\s+as\s+(?P<alias>\w+))?", re.M),
    re.compile(r"^\s*import\s+minigen\.course\.checks\.(?P<mod>\w+)\s+as\s+(?P<alias>\w+)", re.M),
]


# ---------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A lesson as the instructor wrote it: annotated cells (solutions and hidden tests kept)."""
    lesson: str
    nb: dict
    exercises: list  # of builder.ExerciseInfo

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
        sources[p.stem] = Source(p.stem, nb, builder.exercises_in(nb))
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


def identify(path: Path, sources: dict[str, Source]) -> Submission:
    nb, problem = None, None
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            raise ValueError("not a notebook")
    except (OSError, ValueError) as e:
        nb, problem = None, f"the notebook could not be read ({e})"
    lesson = None
    if nb is not None:
        meta = nb.get("metadata", {}).get("minigen", {})
        if isinstance(meta, dict) and meta.get("lesson") in sources:
            lesson = meta["lesson"]
    if lesson is None:
        named = [s for s in sources if s in path.name]
        if named:
            lesson = max(named, key=len)
        elif len(sources) == 1:
            lesson = next(iter(sources))
    stem = path.stem
    if lesson and stem == lesson:
        student = path.parent.name
    elif lesson and lesson in stem:
        student = stem.replace(lesson, "").strip("_-. ") or path.parent.name
    else:
        student = stem
    if lesson is None and problem is None:
        problem = f"cannot tell which lesson this is (known: {', '.join(sources)})"
    return Submission(path, student, lesson, nb, problem)


def plan_cells(source: Source, student_nb: dict) -> list[dict]:
    """The cells to run: the source's, with the student's exercise cells and added cells."""
    canonical = source.nb["cells"]
    known = {c["metadata"]["nbgrader"]["grade_id"]: c for c in canonical}
    # a submission that lost its metadata (cells pasted into a new notebook) is matched by
    # the exercise/check headers and by unchanged source text
    by_text = {builder.source_text(c).strip(): gid for gid, c in known.items()
               if not c["metadata"]["nbgrader"]["solution"]}
    by_number = {}
    for ex in source.exercises:
        by_number[("exercise", ex.number)] = ex.exercise_id
        by_number[("check", ex.number)] = ex.check_id
    answers: dict[str, dict] = {}
    extras: dict[str | None, list] = {}
    anchor = None
    for cell in student_nb.get("cells", []):
        if not isinstance(cell, dict):
            continue
        meta = cell.get("metadata", {})
        gid = meta.get("nbgrader", {}).get("grade_id") if isinstance(meta, dict) and isinstance(meta.get("nbgrader"), dict) else None
        if gid not in known:
            try:
                text = builder.source_text(cell).strip()
                ex = builder.exercise_of(cell)
                number = builder.check_number_of(cell)
            except (TypeError, AttributeError):
                continue
            gid = by_text.get(text)
            if ex is not None:
                gid = by_number.get(("exercise", ex.number), gid)
            elif number is not None:
                gid = by_number.get(("check", number), gid)
        if gid in known:
            anchor = gid
            if known[gid]["metadata"]["nbgrader"]["solution"] and gid not in answers and cell.get("cell_type") == "code":
                answers[gid] = cell
        elif cell.get("cell_type") == "code":
            extras.setdefault(anchor, []).append(cell)

    cells = []

    def add(src, role, grade_id=None):
        cells.append({"i": len(cells), "source": src, "role": role, "grade_id": grade_id})

    for cell in extras.get(None, []):
        add(builder.source_text(cell), "extra")
    for cell in canonical:
        nbg = cell["metadata"]["nbgrader"]
        gid = nbg["grade_id"]
        if cell["cell_type"] == "code" and builder.SKIP_TAG not in cell["metadata"].get("tags", []):
            if nbg["solution"]:
                if gid in answers:
                    add(builder.source_text(answers[gid]), "exercise", gid)
                else:  # deleted: run the stub, so the check says "not done yet"
                    ex = builder.exercise_of(cell)
                    add(builder.strip_solution(builder.source_text(cell), ex), "exercise", gid)
            elif nbg["grade"]:
                add(builder.source_text(cell), "check", gid)
            else:
                add(builder.source_text(cell), "code", gid)
        for extra in extras.get(gid, []):
            add(builder.source_text(extra), "extra")
    return cells


# ---------------------------------------------------------------------------- running
def _child_env(workdir: Path, threads: int) -> dict:
    import minigen

    env = dict(os.environ)
    pkg_root = str(Path(minigen.__file__).resolve().parents[1])
    cache = env.get("MINIGEN_CACHE") or str(Path.home() / ".cache" / "minigen")
    env.update({
        "MINIGEN_QUICK": "1",
        "MINIGEN_CACHE": cache,  # shared dataset cache: built-in datasets are not regenerated per student
        "MPLBACKEND": "Agg",
        "HOME": str(workdir),
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "IPYTHONDIR": str(workdir / ".ipython"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(threads)),
    })
    return env


def _drain(stream, keep: list, cap: int = 16_000):
    """Read the child's raw stdout/stderr (C-level writes, crashes); keep only the last `cap` bytes."""
    tail = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail = (tail + chunk)[-cap:]
    keep.append(tail.decode("utf-8", "replace"))


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _attempt(cells, aliases, results, *, workdir, env, cell_timeout, deadline):
    """Run `cells` in one child process. Returns (outcome, culprit cell index, raw output tail)."""
    r, w = os.pipe()
    token = secrets.token_hex(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigen.course._runner"], cwd=workdir, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(w,), start_new_session=True)
    os.close(w)
    raw: list = []
    drain = threading.Thread(target=_drain, args=(proc.stdout, raw), daemon=True)
    drain.start()
    try:
        proc.stdin.write(json.dumps({"token": token, "fd": w, "cells": cells, "check_aliases": aliases}).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    tok = token.encode()
    buf = b""
    current, started, interrupted_at = None, 0.0, None
    outcome = "eof"
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                outcome = "deadline"
                break
            if current is not None and now - started > cell_timeout:
                if interrupted_at is None:
                    interrupted_at = now
                    results.setdefault(current, {"status": "timeout", "error": None, "output": ""})
                    try:
                        os.kill(proc.pid, signal.SIGINT)  # KeyboardInterrupt inside the cell
                    except ProcessLookupError:
                        pass
                elif now - interrupted_at > GRACE_S:
                    outcome = "killed"
                    break
            ready, _, _ = select.select([r], [], [], 0.1)
            if not ready:
                continue
            data = os.read(r, 1 << 16)
            if not data:
                break  # EOF: the child exited (or closed the pipe)
            buf += data
            *lines, buf = buf.split(b"\n")
            if len(buf) > LINE_CAP:
                buf = b""
            done = False
            for line in lines:
                if not line.startswith(tok):
                    continue  # not ours: a forged or garbled line
                try:
                    msg = json.loads(line[len(tok):])
                except ValueError:
                    continue
                if msg.get("ev") == "start":
                    current, started, interrupted_at = msg["i"], time.monotonic(), None
                elif msg.get("ev") == "end":
                    i = msg["i"]
                    prior = results.get(i)
                    if prior is None or (prior["status"] == "timeout" and not prior.get("output")):
                        status = "ok" if msg["ok"] else "error"
                        if prior is not None:
                            status = "timeout"
                        results[i] = {"status": status, "error": msg.get("error"),
                                      "output": msg.get("output", ""), "restored": msg.get("restored", [])}
                    current = None
                elif msg.get("ev") == "done":
                    done = True
            if done:
                outcome = "done"
                break
    finally:
        _kill(proc)
        os.close(r)
        drain.join(timeout=5)
    return outcome, current, (raw[0] if raw else "")


def run_notebook(cells, aliases, *, cell_timeout: float, timeout: float, threads: int = 1) -> dict:
    """Run the planned cells in a fresh temporary directory; returns {cell index: result}."""
    results: dict[int, dict] = {}
    skip: set[int] = set()
    deadline = time.monotonic() + timeout
    workdir = Path(tempfile.mkdtemp(prefix="minigen-grade-"))
    try:
        env = _child_env(workdir, threads)
        for attempt in range(MAX_RESTARTS + 1):
            todo = [c for c in cells if c["i"] not in skip]
            outcome, culprit, raw = _attempt(todo, aliases, results, workdir=workdir, env=env,
                                             cell_timeout=cell_timeout, deadline=deadline)
            if outcome == "done":
                break
            if outcome == "deadline":
                why = f"not run: the notebook's time limit ({timeout:g} s) was reached"
                if culprit is not None:
                    results.setdefault(culprit, {"status": "timeout", "error": None, "output": ""})
                for c in cells:
                    results.setdefault(c["i"], {"status": "not run", "error": None, "output": why})
                break
            if culprit is None:  # died outside any cell (e.g. at start-up)
                for c in cells:
                    results.setdefault(c["i"], {"status": "crashed", "error": None,
                                                "output": "the grading process died:\n" + raw[-4000:]})
                break
            if outcome == "killed":
                results[culprit] = {"status": "timeout", "error": None, "output": results.get(culprit, {}).get("output", "")}
            else:  # the process died inside the cell: os._exit, segfault, out of memory, closed pipe
                results.setdefault(culprit, {"status": "crashed", "error": None,
                                             "output": "the process running this cell died:\n" + raw[-4000:]})
            skip.add(culprit)
            if attempt == MAX_RESTARTS:
                for c in cells:
                    results.setdefault(c["i"], {"status": "not run", "error": None,
                                                "output": "not run: too many cells timed out or crashed"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------- grading
@dataclass
class ExerciseGrade:
    number: str
    name: str
    points: float
    max_points: float
    status: str      # passed | failed | not done | error | timeout | crashed | not run | missing
    message: str = ""


@dataclass
class NotebookGrade:
    student: str
    lesson: str
    path: Path
    exercises: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # other cells that failed, timed out or crashed
    seconds: float = 0.0

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> float:
        return sum(e.max_points for e in self.exercises)


def grade_submission(sub: Submission, sources: dict[str, Source], *, cell_timeout=60.0, timeout=300.0,
                     threads=1) -> NotebookGrade:
    t0 = time.monotonic()
    source = sources.get(sub.lesson)
    g = NotebookGrade(sub.student, sub.lesson or "?", sub.path)
    if source is None or sub.nb is None:
        exercises = source.exercises if source else []
        for ex in exercises:
            g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "missing", sub.problem or ""))
        g.problems.append(sub.problem or "unknown lesson")
        return g
    cells = plan_cells(source, sub.nb)
    results = run_notebook(cells, check_aliases(source.nb), cell_timeout=cell_timeout, timeout=timeout,
                           threads=threads)
    by_gid = {c["grade_id"]: c for c in cells if c["grade_id"]}
    for ex in source.exercises:
        check = by_gid.get(ex.check_id)
        answer = by_gid.get(ex.exercise_id)
        res = results.get(check["i"]) if check else None
        if check is None or res is None:
            g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "not run", "the check did not run"))
            continue
        err = res.get("error") or {}
        if res["status"] == "ok":
            status, message = "passed", ""
        elif res["status"] == "error":
            if err.get("check_failed") and "is not done yet" in err.get("message", ""):
                status = "not done"
            else:
                status = "failed" if err.get("check_failed") else "error"
            message = err.get("message", "") if err.get("check_failed") else \
                f"{err.get('type')}: {err.get('message')}\n{res.get('output', '')[-3000:]}"
        elif res["status"] == "timeout":
            status, message = "timeout", f"the check did not finish within {cell_timeout:g} s"
        else:
            status, message = res["status"], res.get("output", "")[-3000:]
        ares = results.get(answer["i"]) if answer else None
        if ares and ares["status"] != "ok" and status != "passed":
            aerr = ares.get("error") or {}
            what = {"timeout": f"did not finish within {cell_timeout:g} s", "crashed": "crashed the process",
                    "not run": "was not run"}.get(ares["status"], f"raised {aerr.get('type')}: {aerr.get('message')}")
            message = f"Your exercise cell {what}.\n" + message
        g.exercises.append(ExerciseGrade(ex.number, ex.name, ex.points if status == "passed" else 0,
                                         ex.points, status, message.strip()))
    for c in cells:
        res = results.get(c["i"], {})
        if c["role"] in ("check", "exercise") or res.get("status") in (None, "ok"):
            continue
        err = res.get("error") or {}
        first = c["source"].strip().split("\n", 1)[0][:80]
        detail = f"{err.get('type')}: {err.get('message')}" if res["status"] == "error" else res["status"]
        g.problems.append(f"cell {c['i']} ({c['role']}, `{first}`): {detail}"[:2000])
    restored = sorted({name for r in results.values() for name in r.get("restored", [])})
    if restored:
        g.problems.append("the notebook replaced " + ", ".join(restored) + "; restored before grading")
    g.seconds = time.monotonic() - t0
    return g


def feedback_markdown(grades: list[NotebookGrade]) -> str:
    student = grades[0].student
    lines = [f"# Feedback for {student}", ""]
    for g in grades:
        lines += [f"## {g.lesson} ({g.path.name}): {_num(g.points)} / {_num(g.max_points)} points", "",
                  "| exercise | points | result |", "|---|---|---|"]
        for e in g.exercises:
            lines.append(f"| {e.number} {e.name} | {_num(e.points)} / {_num(e.max_points)} | {e.status} |")
        lines.append("")
        for e in g.exercises:
            if e.status != "passed":
                lines += [f"### Exercise {e.number} {e.name}: {e.status}", ""]
                if e.message:
                    lines += ["```text", e.message.replace("```", "ˋˋˋ"), "```", ""]
        if g.problems:
            lines += ["### Other problems", ""] + [f"- {p}" for p in g.problems] + [""]
    return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "student"


def grade_all(paths, *, source_dir, out, feedback_dir=None, cell_timeout=60.0, timeout=300.0, jobs=1,
              log=sys.stdout) -> list[NotebookGrade]:
    sources = load_sources(source_dir)
    subs = [identify(p, sources) for p in collect(paths)]
    if not subs:
        raise ValueError("no submitted notebooks found")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def one(sub):
        g = grade_submission(sub, sources, cell_timeout=cell_timeout, timeout=timeout, threads=threads)
        print(f"{g.student:>20s}  {g.lesson}  {_num(g.points)}/{_num(g.max_points)}  ({g.seconds:.1f} s)",
              file=log, flush=True)
        return g

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        grades = list(pool.map(one, subs))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    by_student: dict[str, list[NotebookGrade]] = {}
    for g in grades:
        by_student.setdefault(g.student, []).append(g)
    with open(out, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["student", "lesson", "exercise", "points", "max_points", "status"])
        for student in sorted(by_student):
            gs = sorted(by_student[student], key=lambda g: g.lesson)
            for g in gs:
                for e in g.exercises:
                    wr.writerow([student, g.lesson, f"{e.number} {e.name}", _num(e.points), _num(e.max_points), e.status])
            wr.writerow([student, "", "total", _num(sum(g.points for g in gs)), _num(sum(g.max_points for g in gs)), ""])
    fdir = Path(feedback_dir) if feedback_dir else out.with_name(out.stem + "_feedback")
    fdir.mkdir(parents=True, exist_ok=True)
    for student, gs in by_student.items():
        (fdir / f"{_safe(student)}.md").write_text(feedback_markdown(sorted(gs, key=lambda g: g.lesson)),
                                                   encoding="utf-8")
    print(f"wrote {out} and {len(by_student)} feedback file(s) in {fdir}", file=log)
    return grades


def _positive(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="minigen grade",
        description="Grade submitted lesson notebooks: a CSV of points and Markdown feedback per student.")
    p.add_argument("submissions", nargs="+", help="notebooks or folders of notebooks")
    p.add_argument("--out", required=True, help="CSV file to write (student, lesson, exercise, points, ...)")
    p.add_argument("--source", type=Path, default=None,
                   help="the instructor's notebooks: solutions/ (default, includes hidden tests) or lessons/")
    p.add_argument("--feedback", type=Path, default=None, help="feedback folder (default: OUT_feedback/)")
    p.add_argument("--cell-timeout", type=_positive, default=60.0, help="seconds per cell (default 60)")
    p.add_argument("--timeout", type=_positive, default=300.0, help="seconds per notebook (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="notebooks graded in parallel (default 1)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    source = args.source or builder.default_dir("solutions")
    try:
        grade_all(args.submissions, source_dir=source, out=args.out, feedback_dir=args.feedback,
                  cell_timeout=args.cell_timeout, timeout=args.timeout, jobs=args.jobs)
    except (ValueError, builder.NotebookError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
