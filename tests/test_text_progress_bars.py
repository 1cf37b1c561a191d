"""minigen's progress bars are text tqdm bars, never tqdm.auto / tqdm.notebook.

tqdm.auto picks the widget bar inside Jupyter, and without ipywidgets (not a minigen
dependency) that prints "TqdmWarning: IProgress not found. Please update jupyter and
ipywidgets" in the learner's notebook — a warning they cannot act on. Lesson 00's training
cell printed it while minigen.train imported tqdm.auto. Text bars update in place in
JupyterLab, classic Jupyter and VS Code alike.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import minigen

PACKAGE = Path(minigen.__file__).parent
WIDGET_MODULES = ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook", "tqdm.rich", "tqdm.tk", "tqdm.gui")


def _widget_imports(source: str, filename: str) -> list[str]:
    """'file:line: import' for every import of a widget/auto tqdm module in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from tqdm import auto` and `from tqdm.auto import tqdm` both count
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        bad = [n for n in names if n in WIDGET_MODULES]
        if bad:
            found.append(f"{filename}:{node.lineno}: {bad[0]}")
    return found


def test_the_scanner_finds_each_spelling():
    # the scan below must be able to fail: every way of writing the import is caught
    for src in ("from tqdm.auto import tqdm", "import tqdm.autonotebook", "from tqdm import auto",
                "def f():\n    from tqdm.notebook import tqdm\n", "from tqdm import notebook as nb"):
        assert _widget_imports(src, "x.py"), src
    for src in ("from tqdm import tqdm", "import tqdm", "from tqdm import trange"):
        assert not _widget_imports(src, "x.py"), src


def test_no_module_imports_tqdm_auto_or_notebook():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the package was found
    found = [hit for f in files for hit in _widget_imports(f.read_text(encoding="utf-8"), str(f))]
    assert not found, "use `from tqdm import tqdm` (text bars); widget/auto tqdm imported at: " + "; ".join(found)


def test_importing_minigen_and_training_with_a_bar_loads_no_widget_tqdm(tmp_path):
    # every module imported, and the code paths that draw bars run (fit, DDPM and flow sampling):
    # none of them may pull in tqdm.autonotebook, directly or through a dependency
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys, warnings
        import tqdm
        warnings.simplefilter("error", tqdm.TqdmWarning)
        import minigen, torch
        for m in pkgutil.walk_packages(minigen.__path__, "minigen."):
            if not m.name.endswith("__main__"):  # that one runs the CLI
                importlib.import_module(m.name)
        from minigen.autoencoder import AutoEncoder, AutoEncoderConfig
        from minigen.train import fit
        torch.manual_seed(0)
        model = AutoEncoder(AutoEncoderConfig(in_channels=1, image_size=8, channels=4, latent_channels=2))
        fit(model, torch.rand(16, 1, 8, 8) * 2 - 1, steps=2, batch_size=4, out_dir={str(tmp_path / "run")!r},
            progress=True)
        from minigen import diffusion, flow
        for mod, cfg in ((diffusion, dict(timesteps=4)), (flow, {{}})):
            m = mod.build(dict(channels=8, channel_mult=(1,), layers_per_block=1, attention_resolutions=(), **cfg),
                          (1, 8, 8))
            m.sample(2, steps=2, progress=True)
        print("tqdm modules:", sorted(name for name in sys.modules if name.startswith("tqdm")))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert loaded.startswith("tqdm modules:"), out.stdout[-2000:]  # the script ran to its end
    for name in WIDGET_MODULES[:3]:
        assert repr(name) not in loaded, f"{name} was imported: {loaded}"
    assert "TqdmWarning" not in out.stderr, out.stderr[-3000:]


def test_fit_bar_shows_the_loss(tmp_path, capsys, monkeypatch):
    # the bar's postfix carries the running loss (it once compared perf_counter with tqdm's
    # time.time()-based last_print_t, so the loss never appeared); mininterval 0: every step
    import torch
    import tqdm as tqdm_module

    from minigen.autoencoder import AutoEncoder, AutoEncoderConfig
    from minigen.train import fit

    orig = tqdm_module.tqdm.__init__
    monkeypatch.setattr(tqdm_module.tqdm, "__init__", lambda self, *a, **kw: orig(self, *a, **{**kw, "mininterval": 0}))
    torch.manual_seed(0)
    model = AutoEncoder(AutoEncoderConfig(in_channels=1, image_size=8, channels=4, latent_channels=2))
    fit(model, torch.rand(16, 1, 8, 8) * 2 - 1, steps=6, batch_size=4, out_dir=str(tmp_path / "run"),
        progress=True, log_every=0)
    err = capsys.readouterr().err
    assert "loss=" in err, err[-2000:]
