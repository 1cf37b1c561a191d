"""The lesson-08 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch

from minigen.course.checks import l08 as check

from _check_helpers import fails, stub


def vectorised(cost, error):
    c, e = cost[:, None], error[:, None]          # row i, column j: does j dominate i?
    dom = (cost[None] <= c) & (error[None] <= e) & ((cost[None] < c) | (error[None] < e))
    return ~dom.any(dim=1)


def loops(cost, error):
    n = len(cost)
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if j != i and cost[j] <= cost[i] and error[j] <= error[i] and (cost[j] < cost[i] or error[j] < error[i]):
                keep[i] = False
    return keep


def _wrong(dominates, skip_self=True):
    def fn(cost, error):
        n = len(cost)
        return torch.tensor([not any(dominates(cost[j], error[j], cost[i], error[i])
                                     for j in range(n) if not (skip_self and j == i)) for i in range(n)])
    return fn


@pytest.mark.parametrize("answer", [vectorised, loops])
def test_correct(answer, capsys):
    check.pareto_front(answer)
    assert capsys.readouterr().out.startswith("✓ Exercise 8.1 pareto_front: passed")


def test_stub():
    fails(check.pareto_front, stub, "Exercise 8.1 (pareto_front) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (_wrong(lambda cj, ej, ci, ei: cj <= ci and ej <= ei), "identical measurements"),
    (_wrong(lambda cj, ej, ci, ei: cj < ci and ej < ei), "ties on the other"),
    (_wrong(lambda cj, ej, ci, ei: cj >= ci and ej >= ei and (cj > ci or ej > ei)), "flipped"),
    (_wrong(lambda cj, ej, ci, ei: cj <= ci and ej <= ei, skip_self=False), "dominate itself"),
    (lambda cost, error: torch.arange(len(error)) == error.argmin(), "lowest error"),
    (lambda cost, error: vectorised(cost, error).tolist(), "not a list"),
    (lambda cost, error: vectorised(cost, error).int(), "booleans"),
])
def test_mistakes(answer, fragment):
    fails(check.pareto_front, answer, "Exercise 8.1", fragment)
