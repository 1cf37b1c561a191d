"""The command line: help everywhere, bad arguments -> a clear message and exit status 2."""
import subprocess
import sys

import pytest

from minigen import cli


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minigen", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("datasets", "train", "sample", "tour", "lessons", "grade"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["datasets", "train", "sample", "tour"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: minigen " + cmd in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_number_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "autoencoder", "--steps", "many"])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_unknown_model_exits_2_and_lists_models(capsys):
    assert cli.main(["train", "gan9000", "--data", "shapes"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gan9000'" in err and "autoencoder" in err


def test_unknown_dataset_exits_2(capsys, tmp_path):
    code = cli.main(["train", "autoencoder", "--data", "imagenet-1k", "--steps", "1", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "imagenet-1k" in err and "shapes" in err


def test_bad_set_syntax_exits_2(capsys, tmp_path):
    code = cli.main(["train", "autoencoder", "--data", "digits", "--set", "channels", "--out", str(tmp_path)])
    assert code == 2
    assert "key=value" in capsys.readouterr().err


def test_missing_checkpoint_exits_2(capsys, tmp_path):
    assert cli.main(["sample", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_datasets_list_and_preview(tmp_path, capsys):
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "digits" in out
    png = tmp_path / "grid.png"
    assert cli.main(["datasets", "preview", "shapes", "--n", "16", "--out", str(png)]) == 0
    assert png.exists() and png.stat().st_size > 0


def test_train_then_resume_then_sample_autoencoder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "autoencoder", "--data", "digits", "--steps", "6", "--batch-size", "8",
            "--ckpt-every", "3", "--out", str(out), "--device", "cpu", "--set", "channels=8"]
    assert cli.main(args) == 0
    assert (out / "checkpoint.pt").exists()
    # Same command with more steps resumes from the checkpoint.
    args[args.index("6")] = "9"
    assert cli.main(args) == 0
    model, ckpt = cli.load_model(out / "checkpoint.pt")
    assert ckpt["step"] == 9
    assert model.config.channels == 8
    # An autoencoder is not generative: sample says so instead of crashing.
    assert cli.main(["sample", str(out), "--out", str(tmp_path / "s.png")]) == 2
    assert "cannot sample" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["grade", "--help"], ["lessons", "build", "--help"]])
def test_delegated_subcommands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "usage: minigen " + argv[0] in capsys.readouterr().out


def test_delegated_subcommand_bad_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["lessons", "build", "--bogus"])
    assert e.value.code == 2
