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

This module scores (`grade_submission`: the judge's verdicts -> points and messages), runs a
batch (`grade_all`) and is the command line (`main`). Each other job has its own module:
`submissions` (sources, collecting and identifying notebooks, `plan_cells`), `execute`
(running a planned notebook: worker, judge, time limits, replays), `integrity` (does an
answer use minigen's own implementation), `results` (the grade, per-notebook result files,
the CSV) and `feedback` (the Markdown per student). Their names import from here too.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minigen.course import builder
from minigen.course.check_cells import CheckCellError, parse_check_cell
# each job in its own module; the names are importable from here too, as before the split
from minigen.course.execute import GRACE_S, LINE_CAP, MAX_RESTARTS, run_notebook  # noqa: F401
from minigen.course.feedback import feedback_markdown, write_feedback  # noqa: F401
from minigen.course.integrity import REF_RE, defined_names, static_references
from minigen.course.results import (ExerciseGrade, NotebookGrade, fingerprint, load_result, num, result_key,
                                    save_result, write_csv)
from minigen.course.submissions import (MetadataError, Source, Submission, check_aliases,  # noqa: F401
                                        collect, identify, load_sources, plan_cells)


# ---------------------------------------------------------------------------- grading
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
                calls, _ = parse_check_cell(check["source"], source.aliases)
                report_names[check["i"]] = sorted({v for c in calls for k, v in c[2] if k == "name"})
            except (SyntaxError, CheckCellError):
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
            targets = defined_names(inst) | {ex.name}
            flags += static_references(answer["source"], inst, targets)
        for name, ref in (res.get("report") or {}).items():
            if isinstance(ref, str) and REF_RE.match(ref) and len(ref) < 200 and isinstance(name, str):
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
            path = results_dir / result_key(sub)
            fp = fingerprint(sub, source_dir, options)
            g = load_result(path, fp)
            if g is not None:
                print(f"{g.student:>20s}  {g.lesson}  {num(g.points)}/{num(g.max_points)}  (already graded)",
                      file=log, flush=True)
                return g
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
            save_result(path, fp, g)
            print(f"{g.student:>20s}  {g.lesson}  {num(g.points)}/{num(g.max_points)}  ({g.seconds:.1f} s)",
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
    fdir = Path(feedback_dir) if feedback_dir else out.with_name(out.stem + "_feedback")
    write_feedback(fdir, by_student)
    write_csv(out, by_student)
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
