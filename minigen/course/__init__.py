"""The course machinery: run-size budgets, exercise checks, the lessons builder, the grader.

- `budget(default, quick=None, gpu=None)` picks a size (steps, samples, widths) so the same
  notebook finishes in minutes on a laptop CPU, in seconds under test (quick mode) and
  trains longer on a GPU.
- `minigen.course.checks` holds one module of exercise checks per lesson (`l00`, `l01`, ...).
- `minigen.course.builder` turns the solved notebooks in `solutions/` into the exercise
  notebooks in `lessons/` (`minigen lessons build`).
- `minigen.course.grader` grades a folder of submitted notebooks (`minigen grade`).
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def is_quick() -> bool:
    """True when the environment variable MINIGEN_QUICK asks for tiny run sizes (tests, CI, grader)."""
    value = os.environ.get("MINIGEN_QUICK", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"MINIGEN_QUICK={os.environ['MINIGEN_QUICK']!r} is not understood; "
        "set it to 1 for quick mode or 0 (or unset it) for the normal sizes"
    )


def is_grading() -> bool:
    """True when the environment variable MINIGEN_GRADING says a grader runs this notebook.

    `minigen grade` sets it in its workers; for nbgrader run `MINIGEN_GRADING=1 MINIGEN_QUICK=1
    nbgrader autograde ...`. Cells whose first line is `%%skip_when_grading` (training runs
    and plots in the nbgrader export) then do nothing.
    """
    value = os.environ.get("MINIGEN_GRADING", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"MINIGEN_GRADING={os.environ['MINIGEN_GRADING']!r} is not understood; set it to 1 or 0")


def _skip_when_grading(line, cell):
    """%%skip_when_grading: run the cell, unless a grader runs the notebook (see is_grading)."""
    from IPython import get_ipython

    if is_grading():
        print("(skipped while grading: this cell trains or plots, it checks nothing)")
        return None
    result = get_ipython().run_cell(cell)
    if result.error_before_exec or result.error_in_exec:
        raise (result.error_in_exec or result.error_before_exec)
    return None


def _register_magics() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is not None:
        ip.register_magic_function(_skip_when_grading, "cell", "skip_when_grading")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def budget(default, quick=None, gpu=None):
    """Pick a run size: `quick` in quick mode, `gpu` when CUDA is available, else `default`.

    Quick mode wins over the GPU so tests stay fast everywhere. A missing `quick` or `gpu`
    value falls back to `default`.

        steps = budget(2000, quick=20, gpu=10000)
    """
    if is_quick():
        return default if quick is None else quick
    if gpu is not None and _has_gpu():
        return gpu
    return default


_register_magics()

__all__ = ["budget", "is_grading", "is_quick"]
