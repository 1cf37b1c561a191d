"""tools/execute_solutions.py: saved outputs coalesced, times printed, failures reported."""

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("execute_solutions", ROOT / "tools" / "execute_solutions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_progress_bar_is_saved_as_its_final_line(tmp_path, capsys):
    path = _notebook(tmp_path / "bar.ipynb",
                     "from tqdm import tqdm\nfor i in tqdm(range(40), mininterval=0, miniters=1):\n    pass\n"
                     "print('done', i)",
                     "import os\nprint(os.getcwd())")
    assert _tool().main([str(path)]) == 0
    nb = nbformat.read(path, as_version=4)
    bar, cwd = nb.cells
    streams = [o for o in bar.outputs if o.output_type == "stream"]
    assert len(streams) == 2, streams                  # one stdout, one stderr: not 40 updates
    err = next(o.text for o in streams if o.name == "stderr")
    assert "\r" not in err and err.count("40/40") == 1, repr(err)
    assert next(o.text for o in streams if o.name == "stdout") == "done 39\n"
    assert cwd.outputs[0].text.strip() == str(tmp_path)   # the kernel runs in the notebook's folder
    assert "execution" in bar.metadata                     # per-cell timings kept
    out = capsys.readouterr().out
    assert "bar.ipynb" in out and "s wall" in out and "s kernel CPU" in out


def test_bar_that_does_not_leave_leaves_no_output(tmp_path):
    path = _notebook(tmp_path / "gone.ipynb",
                     "from tqdm import tqdm\nfor i in tqdm(range(20), leave=False, mininterval=0, miniters=1):\n    pass")
    assert _tool().main([str(path)]) == 0
    assert nbformat.read(path, as_version=4).cells[0].outputs == []


def test_failing_cell_is_reported_and_file_left_alone(tmp_path, capsys):
    path = _notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    before = path.read_text()
    assert _tool().main([str(path)]) == 1
    assert path.read_text() == before
    assert "FAILED" in capsys.readouterr().err


def test_missing_notebook_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main([str(tmp_path / "nope.ipynb")])
    assert e.value.code == 2
    assert "no such notebook" in capsys.readouterr().err
