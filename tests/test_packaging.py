"""The ways in: pyproject.toml, environment.yml, the README quick start and .ci/run agree."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment_pip_requirements():
    # environment.yml is simple enough to read without PyYAML: the "- pip:" list.
    lines = (ROOT / "environment.yml").read_text().splitlines()
    reqs, in_pip = [], False
    for line in lines:
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
            continue
        if in_pip:
            if not stripped.startswith("- "):
                break
            reqs.append(stripped[2:].strip())
    return reqs


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    expected = set(project["dependencies"])
    for extra in ("lessons", "test"):
        expected |= set(project["optional-dependencies"][extra])
    got = set(_environment_pip_requirements()) - {"-e ."}
    assert got == expected, (
        f"environment.yml and pyproject.toml disagree.\n only in environment.yml: {sorted(got - expected)}\n"
        f" only in pyproject.toml: {sorted(expected - got)}"
    )
    assert "-e ." in _environment_pip_requirements(), "environment.yml must install minigen itself"


def test_python_version_agrees():
    requires = _pyproject()["project"]["requires-python"]
    assert requires == ">=3.10"
    assert "python>=3.10" in (ROOT / "environment.yml").read_text()


def test_runtime_dependencies_are_the_documented_ones():
    names = {re.split(r"[<>=!~ ]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert names == {"torch", "numpy", "matplotlib", "tqdm"}


def _quick_start_commands():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^#+\s*quick\s*-?\s*start.*?$(.*?)```[a-z]*\n(.*?)```", text, re.I | re.M | re.S)
    assert m, "README.md needs a fenced code block under a '## Quick start' heading"
    return [l.strip() for l in m.group(2).splitlines() if l.strip() and not l.strip().startswith("#")]


def test_readme_opens_with_quick_start_of_two_commands():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^##\s+(.*)$", text, re.M)
    assert headings and headings[0].lower() == "quick start", "the first ## heading must be Quick start"
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert "minigen tour" in cmds[0]
    assert "pytest" in cmds[1] and "solutions" in cmds[1] and "--nbval-lax" in cmds[1]


def test_ci_runs_the_readme_test_command_after_pinned_torch():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci
    assert ci.index("torch==2.13.0") < ci.index('bash -c "$cmd"')
    assert "README.md" in ci, ".ci/run must read its test command from the README"


def test_console_script_points_at_main():
    assert _pyproject()["project"]["scripts"]["minigen"] == "minigen.cli:main"
    from minigen.cli import main  # noqa: F401
