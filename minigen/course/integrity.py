"""Integrity: whether a learner's answer is minigen's own implementation instead of their own.

The exercises ask the learner to write what minigen already contains. Two checks say when an
answer takes it from minigen instead (outside minigen.course, whose checks are meant to be
imported); both only report, and the grader scores a hit 0 under ``--forbid-reference``:

- static, in the grader (trusted: no code runs): `static_references` reads the submitted
  solution cell's source for imports of minigen's implementation, attribute access of a name
  the exercise asks for (`defined_names` of the instructor's solution), dynamic imports.
- dynamic, in the worker: `reference_report` says ``"minigen.x.y"`` when a learner object is,
  wraps or calls minigen's own function or class of the same name; the worker answers the
  judge's "report" probe with it (`probe.Peer`), and the grader accepts only answers that
  look like such a name (`REF_RE`).
"""

from __future__ import annotations

import ast
import re


REF_RE = re.compile(r"^minigen(\.\w+)+$")  # what reference_report may answer


def defined_names(src: str) -> set[str]:
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


def reference_report(obj, depth: int = 0) -> str | None:
    """Worker side: 'minigen.x.y' when `obj` is, wraps or calls minigen's own implementation.

    A function counts when it is a minigen function or class (outside minigen.course), a
    functools.partial/bound method/decorated wrapper of one, or when its code reads a
    global or closure variable bound to one whose name is the same as its own.
    """
    import functools
    import types

    def minigen_name(x):
        x = getattr(x, "__func__", x)
        mod = getattr(x, "__module__", None) or ""
        if isinstance(mod, str) and mod.startswith("minigen.") and not mod.startswith("minigen.course"):
            return f"{mod}.{getattr(x, '__qualname__', getattr(x, '__name__', '?'))}"
        return None

    if obj is None or depth > 3:
        return None
    try:
        hit = minigen_name(obj)
        if hit:
            return hit
        if isinstance(obj, functools.partial):
            return reference_report(obj.func, depth + 1)
        inner = getattr(obj, "__wrapped__", None)
        if inner is not None and inner is not obj:
            hit = reference_report(inner, depth + 1)
            if hit:
                return hit
        fn = getattr(obj, "__func__", obj)
        if isinstance(obj, type):  # a class: its methods
            for v in vars(obj).values():
                if isinstance(v, types.FunctionType):
                    hit = _code_refs(v, obj.__name__)
                    if hit:
                        return hit
            return None
        if isinstance(fn, types.FunctionType):
            return _code_refs(fn, fn.__name__)
    except Exception:  # noqa: BLE001 - learner objects can raise from any attribute
        return None
    return None


def _code_refs(fn, own_name):
    import types

    names, strings, stack = set(), set(), [fn.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)  # globals and attribute names the code reads
        names.update(code.co_freevars)
        strings.update(c for c in code.co_consts if isinstance(c, str))  # getattr(module, "name")
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    # a minigen module counts only when the code can reach the same-named function through it
    # (module.NAME or getattr(module, "NAME")): a scaffold that uses diffusion.ddim_step inside
    # the learner's own inpaint is not minigen's inpaint
    reaches_own_name = own_name in names or own_name in strings
    values = []
    g = fn.__globals__
    for n in names:
        if n in g:
            values.append(g[n])
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:
            pass
    for v in values:
        candidates = [v]
        if isinstance(v, types.ModuleType) and getattr(v, "__name__", "").startswith("minigen"):
            if not reaches_own_name:
                continue
            candidates = [getattr(v, own_name, None)]
            for sub in vars(v).values():
                if isinstance(sub, types.ModuleType):
                    candidates.append(getattr(sub, own_name, None))
        for c in candidates:
            if c is None or c is fn:
                continue
            mod = getattr(getattr(c, "__func__", c), "__module__", "") or ""
            if (isinstance(mod, str) and mod.startswith("minigen.") and not mod.startswith("minigen.course")
                    and getattr(c, "__name__", None) == own_name):
                return f"{mod}.{own_name}"
    return None


__all__ = ["REF_RE", "defined_names", "static_references", "reference_report"]
