"""Checks for lesson 08 (which model when): the Pareto front of cost against error.

The check calls the learner's function on fresh seeded random measurements, with ties and
duplicates on purpose (real tables have them), and compares it with a brute-force
reference written here: model i is on the front unless some other model j is at least as
good on both axes and strictly better on one.
"""

from __future__ import annotations

import torch

from minigen.course.checks._framework import Exercise, checker, show_hint

__all__ = ["hint", "pareto_front", "pareto_front_hidden"]


def _front(cost, error, dominates) -> torch.Tensor:
    n = len(cost)
    keep = [not any(dominates(cost[j], error[j], cost[i], error[i]) for j in range(n) if j != i)
            for i in range(n)]
    return torch.tensor(keep, dtype=torch.bool)


def _pareto(cj, ej, ci, ei):  # j dominates i (lower is better on both axes)
    return cj <= ci and ej <= ei and (cj < ci or ej < ei)


def _inputs(g, n):
    """Costs and errors on a coarse grid (so ties happen), plus one exact duplicate pair."""
    cost = torch.randint(1, 7, (n,), generator=g).double()
    error = torch.randint(1, 7, (n,), generator=g).double()
    cost[1], error[1] = cost[0], error[0]
    scale = torch.rand(2, generator=g, dtype=torch.float64) * 10 + 0.1
    return cost * scale[0], error * scale[1]


@checker
def pareto_front(fn) -> None:
    """Exercise 8.1: pareto_front(cost, error) -> bool (N,), True for the models no other model beats."""
    ex = Exercise("8.1", "pareto_front")
    g = torch.Generator().manual_seed(8)
    cases = [_inputs(g, n) for n in (12, 9, 20, 5)]
    # a duplicate pair on the front, and a tie in cost with different errors
    cases.append((torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64),
                  torch.tensor([3.0, 3.0, 2.0, 1.0, 1.5], dtype=torch.float64)))
    for cost, error in cases:
        c_in, e_in = cost.clone(), error.clone()
        out = ex.call(fn, c_in, e_in)
        if isinstance(out, (list, tuple)):
            ex.fail(f"return a torch.Tensor of booleans, one per model, not a {type(out).__name__}")
        out = ex.tensor(out, shape=(len(cost),), what="the mask")
        if out.dtype != torch.bool:
            ex.fail(f"the mask has dtype {out.dtype}; return booleans (e.g. build it with torch.zeros(n, dtype=torch.bool))")
        if not (torch.equal(c_in, cost) and torch.equal(e_in, error)):
            ex.fail("your function changed the measurements in place; leave its inputs as they are")
        ref = _front(cost.tolist(), error.tolist(), _pareto)
        if torch.equal(out, ref):
            continue
        c, e = cost.tolist(), error.tolist()
        mistakes = [
            (torch.zeros_like(ref), "no model is on your front: did you let a model dominate itself? "
                                    "Skip j == i"),
            (_front(c, e, lambda cj, ej, ci, ei: cj <= ci and ej <= ei),
             "two models with identical measurements knocked each other out: 'at least as good on both' "
             "is not enough, j must also be strictly better on one axis"),
            (_front(c, e, lambda cj, ej, ci, ei: cj < ci and ej < ei),
             "you kept models that another one beats on one axis and ties on the other: "
             "j dominates i when it is <= on both axes and < on at least one"),
            (_front(c, e, lambda cj, ej, ci, ei: _pareto(-cj, -ej, -ci, -ei)),
             "your comparisons are flipped: lower cost and lower error are better (FD is an error, not a score)"),
            (torch.arange(len(e)) == int(torch.tensor(e).argmin()),
             "you returned only the model with the lowest error; the front is every model not beaten on both axes"),
        ]
        for wrong, why in mistakes:
            if torch.equal(out, wrong):
                ex.fail(f"wrong mask for cost={[round(v, 3) for v in c]}, error={[round(v, 3) for v in e]}: "
                        f"got {out.int().tolist()}, expected {ref.int().tolist()}", mistake=why)
        ex.fail(f"wrong mask for cost={[round(v, 3) for v in c]}, error={[round(v, 3) for v in e]}: "
                f"got {out.int().tolist()}, expected {ref.int().tolist()}")
    ex.passed("ties, duplicates, four random tables and a hand-made one")


# ---------------------------------------------------------------------------- hidden tests
@checker
def pareto_front_hidden(fn) -> None:
    """Hidden test of 8.1: one model, identical models, and a model beaten on both axes."""
    ex = Exercise("8.1", "pareto_front", hidden=True)
    for cost, error, want in [([1.0], [2.0], [True]), ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [True, True, True]),
                              ([1.0, 2.0], [1.0, 2.0], [True, False]), ([3.0, 1.0, 2.0], [1.0, 3.0, 2.0],
                                                                       [True, True, True])]:
        out = ex.call(fn, torch.tensor(cost), torch.tensor(error))
        out = ex.tensor(out, shape=(len(cost),), dtype=torch.bool, what=f"the mask for cost={cost}, error={error}")
        if out.tolist() != want:
            ex.fail(f"for cost={cost}, error={error} the front is {want}, you returned {out.tolist()}")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '8.1': (
        'A model is on the Pareto front when no other model is at least as good on both cost and '
        'error and strictly better on one of them.',
        "Compare every pair at once with broadcasting: for each i and j, ask whether j's cost and"
        " error are both no larger than i's and at least one is smaller. i is on the front when "
        'no j dominates it. Return a bool tensor with one entry per model.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
