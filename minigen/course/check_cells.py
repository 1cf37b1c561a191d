"""Check cells: which calls of check functions a notebook's check cell makes.

A check cell may only call check functions (``check.f(x, n=3)``) of modules bound to check
modules (`grader.check_aliases`), with arguments that are the learner's names or constants.
`parse_check_cell` reads that from the source without running it, for the judge
(`probe.run_check_cell`, which calls them with proxies for the names) and for the grader
(which names to report on, which lines cannot run when grading).
"""

from __future__ import annotations

import ast


class CheckCellError(ValueError):
    """A check cell contains something other than calls of check functions."""


def parse_check_cell(source: str, aliases: dict[str, str]) -> tuple[list, list[str]]:
    """The check calls of a cell: [(module, function, [args], {kwargs})] with args as
    ("name", learner_name) or ("const", value); and the lines that are not check calls."""
    tree = ast.parse(source)
    calls, skipped = [], []

    def arg(node):
        if isinstance(node, ast.Name):
            return ("name", node.id)
        try:
            return ("const", ast.literal_eval(node))
        except ValueError:
            raise CheckCellError(f"argument `{ast.unparse(node)}` is neither a name nor a constant") from None

    for stmt in tree.body:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name) and call.func.value.id in aliases
                and not call.func.attr.startswith("_")):
            calls.append((aliases[call.func.value.id], call.func.attr, [arg(a) for a in call.args],
                          {k.arg: arg(k.value) for k in call.keywords if k.arg}))
        else:
            skipped.append(ast.get_source_segment(source, stmt) or ast.unparse(stmt))
    return calls, skipped


__all__ = ["CheckCellError", "parse_check_cell"]
