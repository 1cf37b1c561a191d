"""A small framework for exercise checks.

A check calls the learner's own function on fresh random inputs and compares the result
with an independent reference written inside the check module (never minigen's own
implementation: a check that calls the solved package tests nothing). When something is
wrong it raises `CheckFailed` with a message that says which property failed (shape,
dtype, values, gradients, statistics) and, when the wrong answer matches a known wrong
variant, the likely mistake. Success prints exactly one line.

What the learner sees of a failure is the message only: in IPython/Jupyter `CheckFailed`
renders itself (`_render_traceback_`) as its message, plus the learner's own frames when
their function raised, never the check's source or its reference values. The same check
code runs in the learner's kernel on real objects and in the grader on proxies, so it uses
a learner object only by calling it (and, for a module, state_dict/load_state_dict/train/
eval/parameters): see PROBE-CONTRACT in the grader's docs.

    ex = Exercise("1.1", "reparameterize")
    z = ex.call(fn, mu, logvar)                       # stub -> "Exercise 1.1 ... is not done yet"
    z = ex.tensor(z, shape=mu.shape, dtype=torch.float32)
    ex.close(z, reference, atol=1e-5, mistakes=[(wrong, "you used exp(logvar) ...")])
    ex.passed("values, shapes, gradients")
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import textwrap
import traceback

import torch

_COURSE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../minigen/course
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_RED, _RESET = "\x1b[31m", "\x1b[0m"


class CheckFailed(AssertionError):
    """An exercise check failed; the message says what is wrong and, if known, why.

    `learner_traceback` (text or None) holds the frames of the learner's own code when their
    function raised. In IPython the exception renders as the message (and those frames) only.
    """

    learner_traceback: str | None = None

    def __init__(self, message: str = "", learner_traceback: str | None = None):
        super().__init__(message)
        self.learner_traceback = learner_traceback

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: the learner's frames, then the message."""
        lines = []
        if self.learner_traceback:
            lines += ["Your code raised an error (your frames only):"]
            lines += self.learner_traceback.rstrip("\n").split("\n")
            lines += [""]
        message = str(self).split("\n")
        lines += [f"{_RED}✗ {message[0]}{_RESET}"] + message[1:]
        return lines


class LearnerTimeout(TimeoutError):
    """A learner's function ran past a time limit (raised by the grader's proxies)."""


def _learner_frames(exc: BaseException) -> str:
    """The traceback of `exc` without the check framework's frames (and torch's internals)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if not os.path.abspath(f.filename).startswith(_COURSE_DIR)]
    learner = [f for f in mine if not os.path.abspath(f.filename).startswith(_TORCH_DIR)]
    # keep the torch frame the learner's code called into: it names the operation that failed
    if learner and mine and mine[-1] is not learner[-1]:
        learner.append(mine[-1])
    text = "".join(traceback.format_list(learner or mine))
    return text + "".join(traceback.format_exception_only(type(exc), exc))


def learner_traceback_of(exc: BaseException) -> str:
    """The learner-side traceback: the proxy's text in the grader, the filtered frames in a kernel."""
    text = getattr(exc, "learner_traceback", None)
    return text if isinstance(text, str) and text else _learner_frames(exc)


_current: list = [None]  # the Exercise of the check now running, for checker()'s message


def checker(fn):
    """Decorate a public check: an unexpected error inside the check (an answer of a shape or
    type the check did not foresee) becomes a CheckFailed that names the exercise, not a
    traceback through the check's code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _current[0] = None
        try:
            return fn(*args, **kwargs)
        except CheckFailed:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            ex = _current[0]
            label = ex.label if ex is not None else f"check.{fn.__name__}"
            raise CheckFailed(
                f"{label}: the check could not use what your code returned "
                f"({type(e).__name__}: {e}).\n  Compare your function's return value with the "
                "exercise's docstring: its type, shape and dtype") from e
    return wrapper


def show_hint(hints: dict, number: str, level: int = 1) -> None:
    """Print hint `level` (1: the idea, 2: the recipe in words) of exercise `number`."""
    number = str(number)
    if number not in hints:
        raise ValueError(f"no exercise {number!r} in this lesson; the exercises are "
                         + ", ".join(sorted(hints)))
    levels = hints[number]
    if not isinstance(level, int) or not 1 <= level <= len(levels):
        raise ValueError(f"exercise {number} has hints 1 to {len(levels)}, not {level!r}")
    title = ("the idea" if level == 1 else "the recipe, in words") if len(levels) == 2 else f"{level}"
    print(f"Hint {level}/{len(levels)} for exercise {number} ({title}):")
    for para in levels[level - 1].split("\n"):
        print(textwrap.fill(para, width=88, initial_indent="  ", subsequent_indent="  "))
    if level < len(levels):
        print(f'  More: check.hint("{number}", {level + 1})')


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with the global torch RNG seeded, then restore the notebook's RNG state.

    Learner functions that draw random numbers (torch.randn_like, ...) use the global RNG;
    seeding it makes a statistical check deterministic, so a correct answer always passes.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class Exercise:
    """The check context of one exercise: every message names the exercise."""

    def __init__(self, number: str, name: str, *, hidden: bool = False):
        self.number = number
        self.name = name
        self.hidden = hidden  # a hidden test (grading time only): silent when it passes
        _current[0] = self

    # ---------------------------------------------------------------- messages
    @property
    def label(self) -> str:
        return f"Exercise {self.number} ({self.name}){', hidden test' if self.hidden else ''}"

    def fail(self, message: str, mistake: str | None = None):
        text = f"{self.label}: {message}"
        if mistake:
            text += f"\n  Likely mistake: {mistake}"
        raise CheckFailed(text)

    def passed(self, what: str) -> None:
        """Print the single success line (a hidden test prints nothing)."""
        if self.hidden:
            return
        print(f"✓ Exercise {self.number} {self.name}: passed ({what})")

    # ---------------------------------------------------------------- calling the learner
    def callable(self, fn) -> None:
        if not callable(fn):
            self.fail(
                f"expected your function, got a {type(fn).__name__}. Pass the function itself, "
                f"e.g. check.{self.name}({self.name}), not the result of calling it"
            )

    def call(self, fn, *args, **kwargs):
        """Call the learner's function; a stub, an error or a timeout becomes a clear CheckFailed."""
        self.callable(fn)
        try:
            return fn(*args, **kwargs)
        except CheckFailed:
            raise
        except NotImplementedError as e:
            other = re.match(r"\s*Exercise (\d+\.\d+)", str(e))
            if other and other.group(1) != self.number:
                raise CheckFailed(
                    f"{self.label} calls exercise {other.group(1)}, which is not done yet: "
                    f"finish exercise {other.group(1)} first") from None
            where = str(e).split(" — ", 1)[1] if " — " in str(e) else ""  # the stub's "read ..."
            raise CheckFailed(
                f"{self.label} is not done yet: replace the `raise NotImplementedError` "
                f"with your code{f' ({where})' if where else ''}") from None
        except TimeoutError as e:
            limit = getattr(e, "limit_s", None)
            raise CheckFailed(
                f"{self.label}: your function took longer than "
                f"{f'{limit:g} s' if isinstance(limit, (int, float)) else 'the time limit'}; "
                "look for a loop that never ends or far more work than the exercise needs") from None
        except Exception as e:
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if isinstance(e, TypeError) and unexpected:
                raise CheckFailed(
                    f"{self.label}: your function does not accept the keyword argument "
                    f"`{unexpected.group(1)}` ({e}); keep the signature the exercise gives (every "
                    "argument of it is used by the check)") from e
            missing = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.*)", str(e))
            if isinstance(e, TypeError) and missing and not getattr(e, "learner_traceback", None) \
                    and len(traceback.extract_tb(e.__traceback__)) <= 1:
                raise CheckFailed(
                    f"{self.label}: your function was called without {missing.group(1)} (no default "
                    "in your signature); keep the signature the exercise gives, defaults included") from e
            shapes = ", ".join(_describe(a) for a in args)
            if kwargs:
                shapes += (", " if shapes else "") + ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())
            raise CheckFailed(
                f"{self.label}: your function raised {type(e).__name__}: {e}\n"
                f"  It was called with: {shapes or 'no arguments'}.",
                learner_traceback=learner_traceback_of(e)) from e

    def refail(self, error: CheckFailed, mistake: str):
        """Raise `error` again with a "Likely mistake" line (keeping the learner's frames)."""
        if "Likely mistake" in str(error):
            raise error
        raise CheckFailed(f"{error}\n  Likely mistake: {mistake}",
                          learner_traceback=error.learner_traceback) from error.__cause__

    # ---------------------------------------------------------------- properties of outputs
    def tensor(self, out, *, shape=None, dtype=None, what: str = "the output") -> torch.Tensor:
        """Check that `out` is a plain torch.Tensor with the expected shape and dtype."""
        if not isinstance(out, torch.Tensor):
            hint = " (did you forget the `return`?)" if out is None else ""
            if out.__class__.__module__.startswith("numpy"):
                hint = " (a numpy array: stay in torch, e.g. use torch functions instead of np ones)"
            self.fail(f"{what} should be a torch.Tensor, got {type(out).__name__}{hint}")
        if type(out) is not torch.Tensor and not isinstance(out, torch.nn.Parameter):
            # A Tensor subclass can override comparisons; grade what it holds, not how it behaves.
            self.fail(f"{what} should be a plain torch.Tensor, got the subclass {type(out).__name__}")
        if shape is not None and tuple(out.shape) != tuple(shape):
            self.fail(f"{what} has shape {_fmt_shape(out.shape)}, expected {_fmt_shape(shape)}")
        if dtype is not None and out.dtype != dtype:
            self.fail(f"{what} has dtype {out.dtype}, expected {dtype}")
        return out

    def close(self, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
              what: str = "the output", mistakes=()) -> None:
        """Values agree within atol + rtol*|expected|; else name the worst element and the likely mistake.

        `mistakes` is a sequence of (wrong_value, explanation): the values a typical wrong answer
        would produce. If the learner's output matches one of them, the explanation is shown.
        """
        a = actual.detach().to("cpu", torch.float64)
        e = expected.detach().to("cpu", torch.float64)
        if a.shape != e.shape:
            self.fail(f"{what} has shape {_fmt_shape(a.shape)}, expected {_fmt_shape(e.shape)}")
        if not torch.isfinite(a).all():
            bad = int((~torch.isfinite(a)).sum())
            self.fail(f"{what} contains {bad} NaN/inf value(s)")
        if _is_close(a, e, atol, rtol):
            return
        err = (a - e).abs()
        idx = int(err.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
        msg = (
            f"{what} has wrong values: max abs error {float(err.max()):.4g} "
            f"(tolerance {atol:g}{f' + {rtol:g}·|expected|' if rtol else ''}); "
            f"at index {where} you have {float(a.flatten()[idx]):.6g}, expected {float(e.flatten()[idx]):.6g}"
        )
        for wrong, explanation in mistakes:
            w = torch.as_tensor(wrong).detach().to("cpu", torch.float64)
            if w.shape == a.shape and _is_close(a, w, atol, rtol):
                self.fail(msg, mistake=explanation)
        self.fail(msg)

    def gradients_flow(self, output: torch.Tensor, inputs: dict, what: str = "the output") -> None:
        """Backpropagate a random projection of `output`; each named input must get a finite, non-zero grad."""
        if not output.requires_grad:
            self.fail(
                f"{what} does not depend differentiably on the inputs (requires_grad is False): "
                "avoid .detach(), .item(), .numpy() or torch.no_grad() inside your function"
            )
        g = torch.Generator().manual_seed(1234)
        weight = torch.randn(output.shape, generator=g, dtype=output.dtype).to(output.device)
        grads = torch.autograd.grad((output * weight).sum(), list(inputs.values()), allow_unused=True)
        for (name, _), grad in zip(inputs.items(), grads):
            if grad is None or not torch.any(grad != 0):
                self.fail(f"no gradient reaches `{name}`: the output must depend on it differentiably")
            if not torch.isfinite(grad).all():
                self.fail(f"the gradient with respect to `{name}` contains NaN/inf")

    def statistic(self, value: float, expected: float, stderr: float, *, what: str,
                  n: int, mistakes=(), sigmas: float = 6.0) -> None:
        """A sample statistic must lie within `sigmas` standard errors of its expected value.

        With 6 standard errors a correct answer fails with probability below 2e-9 (normal
        tail), and the check's inputs are seeded, so it passes deterministically. `mistakes`
        is a sequence of (expected_value_if_wrong, explanation).
        """
        if not math.isfinite(value):
            self.fail(f"{what} is {value} over {n} samples")
        tol = sigmas * stderr
        if abs(value - expected) <= tol:
            return
        msg = f"{what} is {value:.4g} over {n} samples, expected {expected:.4g} ± {tol:.2g}"
        for wrong, explanation in mistakes:
            if abs(value - wrong) <= tol:
                self.fail(msg, mistake=explanation)
        self.fail(msg)

    def mean_std(self, samples: torch.Tensor, mean: float, std: float, *, what: str = "the samples",
                 mistakes=()) -> None:
        """Check the sample mean and standard deviation of (approximately normal) samples.

        stderr(mean) = std/√n, stderr(std) ≈ std/√(2n) for normal data. `mistakes` holds
        (wrong_mean, wrong_std, explanation) triples.
        """
        s = samples.detach().to("cpu", torch.float64).flatten()
        n = s.numel()
        m, sd = float(s.mean()), float(s.std())
        tol_m, tol_s = 6 * std / math.sqrt(n), 6 * std / math.sqrt(2 * n)
        if abs(m - mean) <= tol_m and abs(sd - std) <= tol_s:
            return
        msg = (f"{what}: mean {m:.4g} and std {sd:.4g} over {n} samples, "
               f"expected mean {mean:.4g} ± {tol_m:.2g} and std {std:.4g} ± {tol_s:.2g}")
        for wm, ws, explanation in mistakes:
            if abs(m - wm) <= 6 * ws / math.sqrt(n) + 1e-12 and abs(sd - ws) <= 6 * ws / math.sqrt(2 * n) + 1e-12:
                self.fail(msg, mistake=explanation)
        self.fail(msg)


def _describe(a) -> str:
    if isinstance(a, torch.Tensor):
        return _fmt_shape(a.shape) + " " + str(a.dtype).replace("torch.", "")
    if isinstance(a, (int, float, bool, str)) or a is None:
        return repr(a)
    return type(a).__name__


def _is_close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())
