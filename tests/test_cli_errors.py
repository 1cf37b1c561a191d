"""Every user mistake and environment fault on the command line: exit status 2 (the command is
wrong) or 1 (the machine is: read-only or full disk, the run folder in use, a diverged run),
one message naming the flag and saying what to do, and no traceback unless --debug asks."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from minigen import cli

TINY = ["--data", "digits", "--n-train", "16", "--batch-size", "8", "--device", "cpu", "--set", "channels=8"]


def invoke(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.err


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A trained autoencoder run folder (channels=8) and a ddpm checkpoint that can sample."""
    from minigen import diffusion, train

    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", "autoencoder", *TINY, "--steps", "1", "--out", str(root / "ae")]) == 0
    model = diffusion.build({"channels": 8, "channel_mult": (1,), "layers_per_block": 1, "attention_resolutions": (),
                             "timesteps": 10, "sample_steps": 2}, (1, 8, 8), None)
    train.fit(model, torch.rand(8, 1, 8, 8) * 2 - 1, steps=1, batch_size=8, out_dir=str(root / "ddpm"), progress=False)
    return root


def _with_unknown_field(src, dst):
    ckpt = torch.load(src, weights_only=True)
    ckpt["model_config"]["hyper_new_option"] = 3
    torch.save(ckpt, dst)
    return dst


def _evil(dst):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this would have run",))

    torch.save({"model": Evil()}, dst)
    return dst


# (id, argv builder(tmp, runs), exit status, text the message must contain)
CASES = [
    ("out-is-a-file", lambda t, r: ["train", "autoencoder", *TINY, "--steps", "1", "--out", str(t / "f.txt")],
     2, ["--out", "is a file"]),
    ("out-under-a-file", lambda t, r: ["train", "autoencoder", *TINY, "--steps", "1", "--out", str(t / "f.txt" / "run")],
     2, ["--out", "is a file, not a folder"]),
    ("out-not-writable", lambda t, r: ["train", "autoencoder", *TINY, "--steps", "1", "--out", "/proc/minigen-run"],
     1, ["--out", "cannot write the run folder"]),
    ("sample-out-is-a-dir", lambda t, r: ["sample", str(r / "ddpm"), "--n", "1", "--out", str(t)],
     2, ["--out", "is a folder", "samples.png"]),
    ("sample-n-negative", lambda t, r: ["sample", str(r / "ddpm"), "--n", "-3"], 2, ["--n", "at least 1, got -3"]),
    ("sample-n-zero", lambda t, r: ["sample", str(r / "ddpm"), "--n", "0"], 2, ["--n", "at least 1, got 0"]),
    ("sample-steps-zero", lambda t, r: ["sample", str(r / "ddpm"), "--steps", "0"], 2,
     ["--steps", "at least 1, got 0", "leave --steps out"]),
    ("sample-steps-negative", lambda t, r: ["sample", str(r / "ddpm"), "--steps", "-3"], 2,
     ["--steps", "at least 1, got -3", "leave --steps out"]),
    ("guidance-nan", lambda t, r: ["sample", str(r / "ddpm"), "--guidance", "nan"], 2, ["--guidance", "finite"]),
    ("set-negative", lambda t, r: ["train", "autoencoder", *TINY, "--set", "latent_channels=-1", "--out", str(t / "o")],
     2, ["--set latent_channels=-1", "at least 1"]),
    ("set-fraction", lambda t, r: ["train", "autoencoder", *TINY, "--set", "latent_channels=2.5", "--out", str(t / "o")],
     2, ["--set latent_channels=2.5", "whole number"]),
    ("set-not-a-number", lambda t, r: ["train", "autoencoder", *TINY, "--set", "channels=abc", "--out", str(t / "o")],
     2, ["--set channels='abc'", "whole number"]),
    ("set-image-size", lambda t, r: ["train", "autoencoder", *TINY, "--set", "image_size=64", "--out", str(t / "o")],
     2, ["--set image_size", "--size"]),
    ("set-unknown-key", lambda t, r: ["train", "vae", *TINY[:-2], "--set", "latent_dimm=4", "--out", str(t / "o")],
     2, ["--set", "latent_dimm", "valid", "latent_dim"]),
    ("set-unknown-key-ddpm", lambda t, r: ["train", "ddpm", *TINY[:-2], "--set", "chanels=4", "--out", str(t / "o")],
     2, ["--set", "chanels", "valid", "channels"]),
    ("resume-other-set", lambda t, r: ["train", "autoencoder", *TINY[:-1], "channels=16", "--steps", "2",
                                       "--out", str(r / "ae")],
     2, ["--set", "channels=8 there, 16 now", "--out"]),
    ("checkpoint-unknown-field", lambda t, r: ["sample", str(_with_unknown_field(r / "ddpm" / "checkpoint.pt", t / "new.pt"))],
     2, ["new.pt", "hyper_new_option", "upgrade minigen"]),
    ("code-running-pickle", lambda t, r: ["sample", str(_evil(t / "evil.pt"))],
     2, ["evil.pt", "could run code", "system", "trusted source"]),
    ("lr-inf", lambda t, r: ["train", "autoencoder", *TINY, "--lr", "inf", "--out", str(t / "o")], 2, ["--lr", "finite"]),
    ("lr-nan", lambda t, r: ["train", "autoencoder", *TINY, "--lr", "nan", "--out", str(t / "o")], 2, ["--lr", "finite"]),
    ("lr-negative", lambda t, r: ["train", "autoencoder", *TINY, "--lr=-1e-3", "--out", str(t / "o")], 2, ["--lr", "> 0"]),
    ("ema-out-of-range", lambda t, r: ["train", "autoencoder", *TINY, "--ema", "1.5", "--out", str(t / "o")], 2, ["--ema"]),
    ("nan-loss", lambda t, r: ["train", "autoencoder", *TINY, "--steps", "6", "--ckpt-every", "1", "--lr", "1e30",
                               "--out", str(t / "o")],
     1, ["became", "Try a lower lr", "lower --lr (now 1e+30)", "--warmup", "--out"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_gives_one_message_and_the_right_status(case, ae_run, tmp_path, capsys):
    name, argv, status, needles = case
    (tmp_path / "f.txt").write_text("a file, not a folder")
    code, err = invoke(argv(tmp_path, ae_run), capsys)
    assert code == status, (code, err)
    assert "Traceback" not in err
    for text in needles:
        assert text in err, (text, err)
    assert len([l for l in err.splitlines() if "error:" in l]) == 1, err  # one message
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp-*"))  # no stray temp files


def test_full_disk_during_training_exits_1_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from minigen import train

    def full(path, state):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(train, "save_checkpoint", full)
    code, err = invoke(["train", "autoencoder", *TINY, "--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "Traceback" not in err
    assert "--out" in err and "disk is full" in err and "resumes from the last checkpoint" in err


def test_a_real_full_disk_from_torch_save_is_an_oserror(tmp_path, monkeypatch):
    """torch's zip writer reports a failed write as a RuntimeError; atomic_save makes it an
    OSError (what the CLI reports as the environment's fault) and leaves no temp file."""
    from minigen import checkpoint

    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError) as e:
        checkpoint.atomic_save({"a": 1}, tmp_path / "c.pt")
    assert e.value.errno in (errno.ENOSPC, errno.EIO) and "file write failed" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_in_use_exits_1_naming_the_pid(tmp_path, capsys):
    from test_train import hold_run_dir

    other = hold_run_dir(tmp_path)
    try:
        code, err = invoke(["train", "autoencoder", *TINY, "--steps", "1", "--out", str(tmp_path)], capsys)
    finally:
        other.kill()
        other.wait()
    assert code == 1 and "Traceback" not in err
    assert f"PID {other.pid}" in err and "--out" in err


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["sample", str(tmp_path / "missing.pt")]
    assert invoke(argv, capsys)[1].count("Traceback") == 0
    code, err = invoke(["--debug", *argv], capsys)
    assert code == 2 and "Traceback" in err and "missing.pt" in err
    code, err = invoke(["sample", "--debug", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv("MINIGEN_DEBUG", "1")
    code, err = invoke(argv, capsys)
    assert code == 2 and "Traceback" in err


@pytest.mark.parametrize("argv, status, flag", [
    (["train", "autoencoder", *TINY, "--out", "/proc/minigen-run"], 1, "--out"),
    (["train", "autoencoder", *TINY, "--lr", "inf"], 2, "--lr"),
    (["sample", "nowhere.pt", "--n", "-3"], 2, "--n"),
])
def test_bad_invocations_in_a_real_process(argv, status, flag, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minigen", *argv], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr and flag in r.stderr


def test_same_seed_same_model_from_the_command_line_and_from_fit(tmp_path, capsys):
    """Two identical `minigen train` commands give bitwise identical initial and trained
    weights (whatever the process drew before), and fit(builder) with the same settings too."""
    from minigen import autoencoder, data, train

    def weights(run):
        return torch.load(run / "checkpoint.pt", weights_only=True)["model"]

    argv = ["train", "autoencoder", *TINY, "--seed", "3"]
    for name, junk in (("a", 1), ("b", 5)):
        torch.rand(junk)  # the global RNG differs before each command
        assert cli.main([*argv, "--steps", "0", "--out", str(tmp_path / name)]) == 0
    a0, b0 = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a0[k], b0[k]) for k in a0)
    for name in ("a", "b"):
        torch.rand(3)
        assert cli.main([*argv, "--steps", "3", "--out", str(tmp_path / name)]) == 0  # resumes at 0
    a3, b3 = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a3[k], b3[k]) for k in a3)
    assert not all(torch.equal(a0[k], a3[k]) for k in a0)  # it did train

    ds = data.load_dataset("digits").head(16)
    res = train.fit(lambda: autoencoder.build({"channels": 8}, tuple(ds.image_shape), len(ds.classes)), ds,
                    steps=3, batch_size=8, lr=2e-4, seed=3, device="cpu", progress=False, log_every=50)
    assert all(torch.equal(res.model.state_dict()[k], a3[k]) for k in a3)
    # a fresh 3-step command (not a resume) gives the same weights again
    assert cli.main([*argv, "--steps", "3", "--out", str(tmp_path / "c")]) == 0
    c3 = weights(tmp_path / "c")
    assert all(torch.equal(c3[k], a3[k]) for k in a3)
    capsys.readouterr()
