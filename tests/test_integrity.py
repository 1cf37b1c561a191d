"""The integrity check's worker side (`reference_report`): minigen's own implementation is
named, the learner's own answer is not, even when the lesson's scaffold uses a minigen module
that also holds a function of the answer's name."""

import json
from pathlib import Path

import pytest

from minigen.course.integrity import defined_names, reference_report

ROOT = Path(__file__).resolve().parents[1]


def define(src):
    ns = {"__name__": "__main__"}
    exec(compile(src, "<answer>", "exec"), ns)
    return ns


@pytest.mark.parametrize("body, expected", [
    # the answer's own code, using other functions of a module that also has `inpaint`
    ("    return diffusion.q_sample(x, t)\n", None),
    ("    step = diffusion.ddim_step\n    return step(x)\n", None),
    # the module's own `inpaint`, by attribute or by getattr
    ("    return diffusion.inpaint(x, t)\n", "minigen.diffusion.inpaint"),
    ("    return getattr(diffusion, 'inpaint')(x, t)\n", "minigen.diffusion.inpaint"),
    # through the package and a submodule
    ("    return minigen.diffusion.inpaint(x, t)\n", "minigen.diffusion.inpaint"),
])
def test_a_module_counts_only_when_the_same_name_is_reached_through_it(body, expected):
    ns = define("import minigen\nfrom minigen import diffusion\n\ndef inpaint(x, t):\n" + body)
    assert reference_report(ns["inpaint"]) == expected


def test_imported_aliased_and_wrapped_references_are_named():
    ns = define("import functools\nfrom minigen.diffusion import q_sample as mine\n"
                "from minigen.vae import gaussian_kl as ref\n"
                "def gaussian_kl(mu, logvar):\n    return ref(mu, logvar)\n"
                "half = functools.partial(mine, noise=None)\n")
    assert reference_report(ns["mine"]) == "minigen.diffusion.q_sample"
    assert reference_report(ns["gaussian_kl"]) == "minigen.vae.gaussian_kl"
    assert reference_report(ns["half"]) == "minigen.diffusion.q_sample"


@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem[:2])
def test_no_solution_is_reported_as_minigens_own(path, monkeypatch, capsys):
    # each lesson's set-up cell (its imports), then its exercise cells as a learner solves them:
    # none of the answers may read as minigen's own implementation (lesson 06's inpaint once did,
    # because its scaffold uses diffusion.ddim_step and minigen.diffusion also has an inpaint)
    monkeypatch.setenv("MINIGEN_QUICK", "1")
    cells = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    ns = define(next(s for s in cells if "import" in s))
    answers = [s for s in cells if "### BEGIN SOLUTION" in s]
    assert answers, f"{path.name} has no exercise cell"
    for src in answers:
        exec(compile(src, path.name, "exec"), ns)
        for name in defined_names(src):
            assert reference_report(ns[name]) is None, f"{path.name}: {name}"
