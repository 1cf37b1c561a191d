"""nbgrader as its users run it: the export writes only its folder, and training/plot cells
skip themselves under MINIGEN_GRADING=1 (`%%skip_when_grading`). The comparison of points
with nbgrader's own autograde is scripts/compare_nbgrader.py (needs nbgrader installed)."""

import json
import os
from pathlib import Path

import pytest

from minigen.course import builder

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_nbgrader_export_writes_only_its_folder(tmp_path, monkeypatch):
    before = _snapshot(REPO / "lessons") | _snapshot(REPO / "solutions")
    monkeypatch.chdir(tmp_path)  # not a checkout: the notebooks are found next to the package
    assert builder.main(["--nbgrader", str(tmp_path / "course")]) == 0
    assert (_snapshot(REPO / "lessons") | _snapshot(REPO / "solutions")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["course"]
    written = sorted(p.relative_to(tmp_path / "course").as_posix() for p in (tmp_path / "course").rglob("*.ipynb"))
    assert written == [f"source/{p.stem}/{p.name}" for p in sorted((REPO / "solutions").glob("*.ipynb"))]
    nb = json.loads((tmp_path / "course" / "source" / "05_ddpm" / "05_ddpm.ipynb").read_text())
    skipped = [c for c in nb["cells"] if builder.SKIP_TAG in c["metadata"].get("tags", [])]
    assert skipped and all(builder.source_text(c).startswith(builder.SKIP_MAGIC + "\n") for c in skipped)
    plain = [c for c in nb["cells"] if c["cell_type"] == "code" and c not in skipped]
    assert not any(builder.SKIP_MAGIC in builder.source_text(c) for c in plain)


def test_nbgrader_export_with_check_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        builder.main(["--nbgrader", str(tmp_path), "--check"])


@pytest.mark.parametrize("grading", ["1", "0"])
def test_skip_when_grading_magic(grading, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("import minigen.course", store_history=False)
    import minigen.course

    minigen.course._register_magics()
    monkeypatch.setenv("MINIGEN_GRADING", grading)
    shell.user_ns.pop("trained", None)
    result = shell.run_cell("%%skip_when_grading\ntrained = 42\n", store_history=False)
    assert result.success
    assert ("trained" in shell.user_ns) == (grading == "0")
    # an error inside a cell that runs is still an error
    monkeypatch.setenv("MINIGEN_GRADING", "0")
    assert not shell.run_cell("%%skip_when_grading\nraise ValueError('x')\n", store_history=False).success
