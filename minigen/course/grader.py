"""Grade a folder of submitted lesson notebooks: a CSV of points and a feedback file per student.

    python -m minigen.course.grader submissions/ --out grades.csv
    minigen grade submitted/ --out grades.csv --jobs 2        # nbgrader's submitted/STUDENT/LESSON/
    minigen grade submissions/ --out grades.csv --forbid-reference --memory 2G

How a submission is graded:

- The lesson is found from the notebook's metadata (`minigen.lesson`, written by the
  builder) or its file or folder name; the student is the file name without the lesson
  (`alice_00_setup_and_tour.ipynb`), its folder (`alice/00_setup_and_tour.ipynb`), or in
  nbgrader's layout the folder above the assignment (`submitted/alice/00_x/00_x.ipynb`).
- The notebook that runs is the instructor's source notebook (solutions/ by default, hidden
  tests included) with only the student's solution cells swapped in (matched by nbgrader
  grade_id, or by the `# Exercise N.M` header when the metadata was lost). Cells the student
  added or edited elsewhere do not run; the feedback lists them. Cells tagged
  `skip-grading` are not run. Malformed metadata gives that notebook an error row.
- The notebook runs in a worker (minigen.course._runner) that never runs a check. At each
  check cell the trusted judge (minigen.course._judge) runs the check functions with
  proxies for the learner's names (minigen.course.probe): every operation is a probe
  answered by the worker with plain data decoded with torch.load(weights_only=True).
  Points and feedback come only from the judge's verdicts.
- Isolation (minigen.course.sandbox): the worker runs in its own session, as a dedicated
  unprivileged uid when the grader is root, in a private mount namespace and a cgroup with a
  memory limit, and everything it started is killed before its result is written. A cell
  over its time limit is interrupted; if it does not stop, the worker is killed and the
  notebook replayed without that cell, so later exercises are still graded.
- Results are written per notebook as each finishes (OUT_results/, atomically), so an
  interrupted batch rerun grades only what is missing; the CSV comes last.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import math
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from minigen.course import builder, probe

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
                    _, skipped = probe.parse_check_cell(builder.source_text(cell), src.aliases)
                except (SyntaxError, probe.CheckCellError) as e:
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


# ---------------------------------------------------------------------------- running
def _child_env(workdir: Path, threads: int, cache: Path | None) -> dict:
    import minigen

    pkg_root = str(Path(minigen.__file__).resolve().parents[1])
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "MINIGEN_QUICK": "1",
        "MINIGEN_GRADING": "1",
        "MINIGEN_CACHE": str(cache or workdir / "cache"),
        "MPLBACKEND": "Agg",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "IPYTHONDIR": str(workdir / ".ipython"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
    })
    return env


def _drain(stream, keep: list, cap: int = 16_000):
    """Read a child's raw stdout/stderr (C-level writes, crashes); keep only the last `cap` bytes."""
    tail = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail = (tail + chunk)[-cap:]
    keep.append(tail.decode("utf-8", "replace"))


class _Lines:
    """Token-tagged JSON lines from a pipe, with a cap on the line length."""

    def __init__(self, fd, token: bytes = b""):
        self.fd, self.token, self.buf, self.eof = fd, token, b"", False

    def read(self) -> list[dict]:
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.eof = True
            return []
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > LINE_CAP:
            self.buf = b""
        out = []
        for line in lines:
            if not line.startswith(self.token):
                continue  # not ours: a forged or garbled line
            try:
                msg = json.loads(line[len(self.token):])
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out


def _attempt(cells, aliases, results, *, workdir, env, cell_timeout, deadline, box, report_names):
    """Run `cells` in one worker with one judge. Returns (outcome, culprit cell index, raw output tail)."""
    from minigen.course import sandbox

    r, w = os.pipe()
    jr, jw = os.pipe()
    judge_sock, worker_sock = socket.socketpair()
    token = secrets.token_hex(16)
    roles = {c["i"]: c for c in cells}
    judge_env = dict(env, HOME=os.environ.get("HOME", str(workdir)), TMPDIR=tempfile.gettempdir())
    judge = subprocess.Popen(
        [sys.executable, "-m", "minigen.course._judge"], cwd=tempfile.gettempdir(), env=judge_env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(jw, judge_sock.fileno()), start_new_session=True)
    sandbox._known_children.add(judge.pid)  # ours: never taken for a notebook's orphan
    proc = box.spawn([sys.executable, "-m", "minigen.course._runner"], cwd=workdir, env=env,
                     pass_fds=(w, worker_sock.fileno()))
    os.close(w)
    os.close(jw)
    jsock_fd, wsock_fd = judge_sock.fileno(), worker_sock.fileno()
    judge_sock.close()
    worker_sock.close()
    raw: list = []
    jraw: list = []
    drains = [threading.Thread(target=_drain, args=(proc.stdout, raw), daemon=True),
              threading.Thread(target=_drain, args=(judge.stdout, jraw), daemon=True)]
    for t in drains:
        t.start()
    try:
        judge.stdin.write((json.dumps({"result_fd": jw, "probe_fd": jsock_fd,
                                       "probe_timeout": cell_timeout}) + "\n").encode())
        judge.stdin.flush()
        proc.stdin.write(json.dumps({"token": token, "fd": w, "probe_fd": wsock_fd, "cells": cells}).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    wlines, jlines = _Lines(r, token.encode()), _Lines(jr)
    current, started, interrupted_at = None, 0.0, None
    asked: set = set()     # check cells sent to the judge
    pending = None         # a check cell whose verdict has not arrived
    outcome = "eof"
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                outcome = "deadline"
                break
            limit = cell_timeout + (5.0 if current is not None and roles.get(current, {}).get("role") == "check"
                                    else 0.0)
            if current is not None and now - started > limit:
                if interrupted_at is None:
                    interrupted_at = now
                    if roles.get(current, {}).get("role") != "check":
                        results.setdefault(current, {"status": "timeout", "error": None, "output": ""})
                    try:
                        os.kill(proc.pid, signal.SIGINT)  # KeyboardInterrupt inside the cell
                    except (ProcessLookupError, PermissionError):
                        pass
                elif now - interrupted_at > GRACE_S:
                    outcome = "killed"
                    break
            fds = [fd for fd, src in ((r, wlines), (jr, jlines)) if not src.eof]
            if not fds:
                break
            ready, _, _ = select.select(fds, [], [], 0.1)
            done = False
            if jr in ready:
                for msg in jlines.read():
                    if msg.get("ev") == "result" and msg.get("i") in roles:
                        i = msg["i"]
                        err = msg.get("error")
                        status = "ok" if msg.get("ok") else ("timeout" if (err or {}).get("timeout") else "error")
                        results[i] = {"status": status, "error": err, "output": msg.get("output", ""),
                                      "report": msg.get("report") or {}}
                        if pending == i:
                            pending = None
                if jlines.eof and pending is not None:
                    results.setdefault(pending, {"status": "crashed", "error": None,
                                                 "output": "the grader's checking process died:\n"
                                                           + "".join(jraw)[-2000:]})
                    pending = None
            if r in ready:
                for msg in wlines.read():
                    ev = msg.get("ev")
                    i = msg.get("i")
                    if ev == "start" and i in roles:
                        current, started, interrupted_at = i, time.monotonic(), None
                        if roles[i]["role"] == "check" and i not in asked:
                            asked.add(i)
                            pending = i
                            cmd = {"cmd": "check", "i": i, "source": roles[i]["source"], "aliases": aliases,
                                   "cell_timeout": cell_timeout, "report_names": report_names.get(i, [])}
                            try:
                                judge.stdin.write((json.dumps(cmd) + "\n").encode())
                                judge.stdin.flush()
                            except (BrokenPipeError, OSError):
                                pass
                    elif ev == "end" and i in roles and i == current:
                        if roles[i]["role"] != "check":
                            prior = results.get(i)
                            if prior is None or (prior["status"] == "timeout" and not prior.get("output")):
                                status = "ok" if msg.get("ok") else "error"
                                if prior is not None:
                                    status = "timeout"
                                err = msg.get("error") if isinstance(msg.get("error"), dict) else None
                                results[i] = {"status": status, "error": err,
                                              "output": str(msg.get("output", ""))[-20_000:]}
                        current = None
                    elif ev == "done":
                        done = True
            if done or (wlines.eof and pending is None):
                outcome = "done" if done else "eof"
                break
        # a verdict still on its way (the worker finished or died during the last check)
        wait_until = min(deadline, time.monotonic() + cell_timeout + 5.0)
        while pending is not None and not jlines.eof and time.monotonic() < wait_until:
            ready, _, _ = select.select([jr], [], [], 0.1)
            if ready:
                for msg in jlines.read():
                    if msg.get("ev") == "result" and msg.get("i") == pending:
                        err = msg.get("error")
                        results[pending] = {"status": "ok" if msg.get("ok") else
                                            ("timeout" if (err or {}).get("timeout") else "error"),
                                            "error": err, "output": msg.get("output", ""),
                                            "report": msg.get("report") or {}}
                        pending = None
    finally:
        box.kill_all(proc)
        try:
            judge.stdin.close()
        except OSError:
            pass
        try:
            judge.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _killpg(judge)
        sandbox._known_children.discard(judge.pid)
        os.close(r)
        os.close(jr)
        for t in drains:
            t.join(timeout=5)
    return outcome, current, (raw[0] if raw else "")


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_notebook(cells, aliases, *, cell_timeout: float, timeout: float, threads: int = 1, box=None,
                 report_names=None) -> dict:
    """Run the planned cells in a fresh temporary directory; returns {cell index: result}."""
    from minigen.course import sandbox

    box = box or sandbox.Sandbox.for_slot(0)
    results: dict[int, dict] = {}
    skip: set[int] = set()
    deadline = time.monotonic() + timeout
    workdir = box.make_workdir()
    try:
        env = _child_env(workdir, threads, box.cache_dir(workdir))
        for attempt in range(MAX_RESTARTS + 1):
            todo = [c for c in cells if c["i"] not in skip]
            outcome, culprit, raw = _attempt(todo, aliases, results, workdir=workdir, env=env,
                                             cell_timeout=cell_timeout, deadline=deadline, box=box,
                                             report_names=report_names or {})
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
                prior = results.get(culprit, {})
                if prior.get("status") not in ("ok", "error"):  # a check's verdict stands
                    results[culprit] = {"status": "timeout", "error": None, "output": prior.get("output", "")}
            else:  # the process died inside the cell: os._exit, segfault, out of memory, closed pipe
                why = box.death_reason()
                results.setdefault(culprit, {"status": "crashed", "error": None,
                                             "output": f"the process running this cell died{why}:\n" + raw[-4000:]})
            skip.add(culprit)
            if attempt == MAX_RESTARTS:
                for c in cells:
                    results.setdefault(c["i"], {"status": "not run", "error": None,
                                                "output": "not run: too many cells timed out or crashed"})
    finally:
        box.remove_workdir(workdir)
    return results


# ---------------------------------------------------------------------------- integrity
_REF_RE = re.compile(r"^minigen(\.\w+)+$")


def _defined_names(src: str) -> set[str]:
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def static_references(student_src: str, instructor_src: str, targets: set[str]) -> list[str]:
    """What a solution cell takes from minigen itself, read from its source (trusted: no code runs).

    Flags imports from minigen (outside minigen.course) of a name the exercise asks for, any
    attribute access `something.NAME` for such a name, whole-module imports of minigen's
    implementation modules the instructor's solution does not import, and dynamic imports
    of minigen (`__import__`, `importlib`).
    """
    try:
        tree = ast.parse(student_src)
    except SyntaxError:
        return []
    try:
        own = ast.parse(instructor_src)
    except SyntaxError:
        own = ast.parse("")
    allowed_modules = {a.name for n in ast.walk(own) if isinstance(n, ast.Import) for a in n.names}
    allowed_modules |= {n.module for n in ast.walk(own) if isinstance(n, ast.ImportFrom) and n.module}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "minigen" \
                and not n.module.startswith("minigen.course"):
            for a in n.names:
                if a.name in targets or a.name == "*" or n.module not in allowed_modules:
                    found.append(f"imports {n.module}.{a.name}")
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split(".")[0] == "minigen" and not a.name.startswith("minigen.course") \
                        and a.name not in allowed_modules:
                    found.append(f"imports {a.name}")
        elif isinstance(n, ast.Attribute) and n.attr in targets and not (
                isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")):
            found.append(f"uses {ast.unparse(n)}")
        elif isinstance(n, ast.Call):
            f = ast.unparse(n.func)
            if f in ("__import__", "importlib.import_module", "import_module") and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) and "minigen" in a.value
                    and "minigen.course" not in a.value for a in n.args):
                found.append(f"imports minigen dynamically ({ast.unparse(n)[:60]})")
    return sorted(set(found))


# ---------------------------------------------------------------------------- grading
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


_NEEDS = re.compile(r"Exercise (\d+\.\d+)")


def _needs_other(text: str, number: str) -> str | None:
    """The earlier exercise a NotImplementedError message names, if it is not `number` itself."""
    for m in _NEEDS.finditer(text or ""):
        if m[1] != number:
            return m[1]
    return None


def _with_traceback(message: str, tb: str | None) -> str:
    if tb and tb.strip() and tb.strip() not in message:
        return message + "\n\nWhere, in your code:\n" + tb.strip()[-3000:]
    return message


def grade_submission(sub: Submission, sources: dict[str, Source], *, cell_timeout=60.0, timeout=300.0,
                     threads=1, box=None, forbid_reference=False) -> NotebookGrade:
    t0 = time.monotonic()
    source = sources.get(sub.lesson)
    g = NotebookGrade(sub.student, sub.lesson or "?", sub.path)
    if source is None or sub.nb is None:
        for ex in source.exercises if source else []:
            g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "missing", sub.problem or ""))
        g.problems.append(sub.problem or "unknown lesson")
        return g
    try:
        cells = plan_cells(source, sub.nb, g.ignored)
    except (MetadataError, TypeError, AttributeError, KeyError) as e:
        why = f"malformed notebook metadata: {e}"
        for ex in source.exercises:
            g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "error", why))
        g.problems.append(why)
        return g
    by_gid = {c["grade_id"]: c for c in cells if c["grade_id"]}
    report_names = {}
    for ex in source.exercises:
        check = by_gid.get(ex.check_id)
        if check is not None:
            try:
                calls, _ = probe.parse_check_cell(check["source"], source.aliases)
                report_names[check["i"]] = sorted({v for c in calls for k, v in c[2] if k == "name"})
            except (SyntaxError, probe.CheckCellError):
                pass
    results = run_notebook(cells, source.aliases, cell_timeout=cell_timeout, timeout=timeout,
                           threads=threads, box=box, report_names=report_names)
    folded: dict[str, list] = {}  # unfinished exercise -> what could not be checked because of it
    passed = set()
    for ex in source.exercises:
        check = by_gid.get(ex.check_id)
        answer = by_gid.get(ex.exercise_id)
        res = results.get(check["i"]) if check else None
        if check is None or res is None:
            g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "not run", "the check did not run"))
            continue
        err = res.get("error") or {}
        learner_tb = err.get("learner_traceback")
        if res["status"] == "ok":
            status, message = "passed", ""
            passed.add(ex.number)
        elif res["status"] == "error":
            text = str(err.get("message", ""))
            if err.get("check_failed") and "is not done yet" in text:
                status = "not done"
                other = _needs_other(text.split("is not done yet", 1)[1] if "is not done yet" in text else "",
                                     ex.number)
                if other and other not in passed:
                    folded.setdefault(other, []).append(ex.number)
            elif err.get("probe_error"):
                status = "crashed"
                text = ("the notebook's process stopped answering the grader (your code ended it, or wrote "
                        "into the grader's channel) while this exercise was checked: " + text)
            else:
                status = "failed" if err.get("check_failed") else "error"
            message = text if err.get("check_failed") or err.get("type") == "NameError" else \
                f"{err.get('type')}: {text}"
            if status != "not done":
                message = _with_traceback(message, learner_tb)
        elif res["status"] == "timeout":
            status = "timeout"
            message = str(err.get("message") or f"the check did not finish within {cell_timeout:g} s "
                          "(your function is too slow or loops forever)")
        else:
            status, message = res["status"], res.get("output", "")[-3000:]
        ares = results.get(answer["i"]) if answer else None
        if ares and ares["status"] != "ok" and status != "passed":
            aerr = ares.get("error") or {}
            what = {"timeout": f"did not finish within {cell_timeout:g} s (an endless loop, or too much work "
                               "for the grader's time limit)",
                    "crashed": "stopped the process: " + str(ares.get("output", ""))[-1500:],
                    "not run": "was not run"}.get(ares["status"], f"raised {aerr.get('type')}: {aerr.get('message')}")
            message = f"Your exercise cell {what}.\n" + message
            if ares["status"] == "error" and ares.get("output"):
                message += "\n\nYour cell's output (traceback):\n" + str(ares["output"])[-3000:]
        # integrity: the submitted solution cell's source (trusted) and the worker's own account
        flags = []
        if answer is not None:
            inst = builder.source_text(next(c for c in source.nb["cells"]
                                            if c["metadata"]["nbgrader"]["grade_id"] == ex.exercise_id))
            targets = _defined_names(inst) | {ex.name}
            flags += static_references(answer["source"], inst, targets)
        for name, ref in (res.get("report") or {}).items():
            if isinstance(ref, str) and _REF_RE.match(ref) and len(ref) < 200 and isinstance(name, str):
                flags.append(f"{name[:40]} is {ref}")
        integrity = "; ".join(sorted(set(flags)))[:300]
        points = ex.points if status == "passed" else 0
        if integrity and forbid_reference:
            if status == "passed":
                message = ""
            status, points = "reference", 0
            message = (f"0 points: this answer uses minigen's own implementation ({integrity}); "
                       "the exercise asks you to write it yourself.\n" + message).strip()
        g.exercises.append(ExerciseGrade(ex.number, ex.name, points, ex.points, status, message.strip(),
                                         integrity))
    for other, numbers in folded.items():
        for e in g.exercises:
            if e.number in numbers:
                e.message = f"not checked: it uses exercise {other}, which is not done yet"
    stub_blocked = []
    for c in cells:
        res = results.get(c["i"], {})
        if c["role"] in ("check", "exercise") or res.get("status") in (None, "ok"):
            continue
        err = res.get("error") or {}
        first = c["source"].strip().split("\n", 1)[0][:80]
        if res["status"] == "error" and err.get("not_implemented"):
            stub_blocked.append(c["i"])
            continue
        if res["status"] == "error":
            detail = f"{err.get('type')}: {err.get('message')}"
            out = str(res.get("output", "")).strip()
            if out:
                detail += "\n" + out[-1500:]
        elif res["status"] == "timeout":
            detail = f"timeout: did not finish within {cell_timeout:g} s"
        elif res["status"] == "crashed":
            detail = "crashed: " + str(res.get("output", ""))[-1500:]
        else:
            detail = str(res.get("output") or res["status"])
        g.problems.append(f"cell {c['i']} ({c['role']}, `{first}`): {detail}"[:3000])
    if stub_blocked:
        g.problems.insert(0, f"{len(stub_blocked)} cell(s) stopped at an exercise that is not done yet "
                             f"(NotImplementedError): cells {', '.join(map(str, stub_blocked))}")
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


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "student"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _result_key(sub: Submission) -> str:
    digest = hashlib.sha1(str(sub.path.resolve()).encode()).hexdigest()[:10]
    return f"{_safe(sub.student)}--{_safe(sub.lesson or 'unknown')}--{digest}.json"


def _fingerprint(sub: Submission, source_dir, options: dict) -> str:
    h = hashlib.sha256()
    try:
        h.update(sub.path.read_bytes())
    except OSError:
        h.update(b"unreadable")
    for p in sorted(Path(source_dir).glob("*.ipynb")):
        h.update(p.read_bytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def grade_all(paths, *, source_dir, out, feedback_dir=None, cell_timeout=60.0, timeout=300.0, jobs=1,
              memory=4 << 30, forbid_reference=False, log=None) -> list[NotebookGrade]:
    from minigen.course import sandbox

    log = log or sys.stdout
    sources = load_sources(source_dir)
    subs = []
    for p in collect(paths):
        try:
            subs.append(identify(p, sources))
        except Exception as e:  # noqa: BLE001 - one odd file must not stop the batch
            subs.append(Submission(p, p.stem, None, None, f"the notebook could not be read ({e})"))
    if not subs:
        raise ValueError("no submitted notebooks found")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_dir = out.with_name(out.stem + "_results")
    results_dir.mkdir(exist_ok=True)
    os.chmod(results_dir, 0o700)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    options = {"cell_timeout": cell_timeout, "timeout": timeout, "memory": memory,
               "forbid_reference": forbid_reference}

    sandbox.become_subreaper()
    shared_root = Path(tempfile.mkdtemp(prefix="minigen-grader-shared-"))
    boxes = queue.Queue()
    made = []
    try:
        shared = sandbox.prepare_shared_cache(shared_root) if os.geteuid() == 0 else None
        for slot in range(max(1, jobs)):
            box = sandbox.Sandbox.for_slot(slot, memory, shared)
            box.hide = [Path(source_dir), out.parent, results_dir] + [
                Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
            made.append(box)
            boxes.put(box)
        for text in sandbox.notes() + [w for s in sources.values() for w in s.warnings]:
            print(f"note: {text}", file=log, flush=True)

        def one(sub):
            path = results_dir / _result_key(sub)
            fp = _fingerprint(sub, source_dir, options)
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if saved.get("fingerprint") == fp:
                    g = NotebookGrade.from_json(saved["grade"])
                    print(f"{g.student:>20s}  {g.lesson}  {_num(g.points)}/{_num(g.max_points)}  (already graded)",
                          file=log, flush=True)
                    return g
            except (OSError, ValueError, KeyError, TypeError):
                pass
            box = boxes.get()
            try:
                g = grade_submission(sub, sources, cell_timeout=cell_timeout, timeout=timeout, threads=threads,
                                     box=box, forbid_reference=forbid_reference)
            except Exception as e:  # noqa: BLE001 - an error row of its own; the batch goes on
                g = NotebookGrade(sub.student, sub.lesson or "?", sub.path)
                src = sources.get(sub.lesson)
                for ex in src.exercises if src else []:
                    g.exercises.append(ExerciseGrade(ex.number, ex.name, 0, ex.points, "error",
                                                     f"could not be graded: {type(e).__name__}: {e}"))
                g.problems.append(f"could not be graded: {type(e).__name__}: {e}")
            finally:
                boxes.put(box)
            # every process of this notebook is gone (kill_all) before its result is written
            _atomic_write(path, json.dumps({"fingerprint": fp, "grade": g.to_json()}))
            print(f"{g.student:>20s}  {g.lesson}  {_num(g.points)}/{_num(g.max_points)}  ({g.seconds:.1f} s)",
                  file=log, flush=True)
            return g

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            grades = list(pool.map(one, subs))
    finally:
        for box in made:
            box.close()
        shutil.rmtree(shared_root, ignore_errors=True)

    # the CSV last, after every worker is gone
    by_student: dict[str, list[NotebookGrade]] = {}
    for g in grades:
        by_student.setdefault(g.student, []).append(g)
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["student", "lesson", "exercise", "points", "max_points", "status", "integrity"])
    for student in sorted(by_student):
        gs = sorted(by_student[student], key=lambda g: (g.lesson, str(g.path)))
        for g in gs:
            for e in g.exercises:
                wr.writerow([student, g.lesson, f"{e.number} {e.name}", _num(e.points), _num(e.max_points),
                             e.status, e.integrity])
            if not g.exercises:
                wr.writerow([student, g.lesson, "", 0, 0, "error", ""])
        wr.writerow([student, "", "total", _num(sum(g.points for g in gs)), _num(sum(g.max_points for g in gs)),
                     "", ""])
    fdir = Path(feedback_dir) if feedback_dir else out.with_name(out.stem + "_feedback")
    fdir.mkdir(parents=True, exist_ok=True)
    safe_names: dict[str, list] = {}
    for student in by_student:
        safe_names.setdefault(_safe(student).lower(), []).append(student)
    for student, gs in by_student.items():
        name = _safe(student)
        if len(safe_names[name.lower()]) > 1:  # two names that look alike on disk: keep both apart
            name += "-" + hashlib.sha1(student.encode()).hexdigest()[:8]
        _atomic_write(fdir / f"{name}.md", feedback_markdown(sorted(gs, key=lambda g: (g.lesson, str(g.path)))))
    _atomic_write(out, buf.getvalue())
    print(f"wrote {out} and {len(by_student)} feedback file(s) in {fdir}", file=log)
    return grades


def _positive(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _memory(text):
    from minigen.course.sandbox import _parse_size

    try:
        value = _parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4G or 1500M, got {text}") from None
    if value < 256 << 20:
        raise argparse.ArgumentTypeError(f"a memory limit below 256M cannot even import torch, got {text}")
    return value


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="minigen grade",
        description="Grade submitted lesson notebooks: a CSV of points and Markdown feedback per student.")
    p.add_argument("submissions", nargs="+", help="notebooks or folders of notebooks (nbgrader's submitted/ "
                                                  "layout works: submitted/STUDENT/LESSON/LESSON.ipynb)")
    p.add_argument("--out", required=True, help="CSV file to write (student, lesson, exercise, points, ...)")
    p.add_argument("--source", type=Path, default=None,
                   help="the instructor's notebooks: solutions/ (default, includes hidden tests) or lessons/")
    p.add_argument("--feedback", type=Path, default=None, help="feedback folder (default: OUT_feedback/)")
    p.add_argument("--cell-timeout", type=_positive, default=60.0, help="seconds per cell (default 60)")
    p.add_argument("--timeout", type=_positive, default=300.0, help="seconds per notebook (default 300)")
    p.add_argument("--memory", type=_memory, default=4 << 30,
                   help="memory limit per notebook, e.g. 4G (default 4G; a cgroup where writable, else RLIMIT_AS)")
    p.add_argument("--jobs", type=int, default=1, help="notebooks graded in parallel (default 1)")
    p.add_argument("--forbid-reference", action="store_true",
                   help="0 points for an exercise answered with minigen's own implementation")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    source = args.source or builder.default_dir("solutions")
    try:
        grade_all(args.submissions, source_dir=source, out=args.out, feedback_dir=args.feedback,
                  cell_timeout=args.cell_timeout, timeout=args.timeout, jobs=args.jobs, memory=args.memory,
                  forbid_reference=args.forbid_reference)
    except (ValueError, builder.NotebookError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
