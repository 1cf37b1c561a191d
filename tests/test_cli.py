"""The command line: help everywhere, bad arguments -> a clear message and exit status 2."""
import subprocess
import sys

import pytest
import torch

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


# ---------------------------------------------------------------------------- latent diffusion


def test_train_ldm_without_autoencoder_says_how_to_get_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))
    assert cli.main(["train", "ldm", "--data", "shapes", "--n-train", "8", "--steps", "1",
                     "--out", str(tmp_path / "ldm")]) == 2
    err = capsys.readouterr().err
    assert "autoencoder=runs/vqgan/checkpoint.pt" in err and "minigen train vqgan" in err


def test_train_ldm_on_a_dataset_without_captions_exits_2(capsys, tmp_path):
    assert cli.main(["train", "ldm", "--data", "digits", "--n-train", "8", "--steps", "1",
                     "--set", f"autoencoder={tmp_path / 'ae.pt'}", "--out", str(tmp_path / "ldm")]) == 2
    assert "no captions" in capsys.readouterr().err


def test_train_vqgan_then_ldm_then_sample_with_a_prompt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path / "cache"))
    vq, ld = tmp_path / "vqgan", tmp_path / "ldm"
    assert cli.main(["train", "vqgan", "--data", "shapes", "--n-train", "64", "--steps", "2", "--batch-size", "8",
                     "--out", str(vq), "--device", "cpu", "--set", "ch=8", "--set", "z_channels=8",
                     "--set", "code_dim=4", "--set", "num_codes=16", "--set", "perceptual=none"]) == 0
    args = ["train", "ldm", "--data", "shapes", "--n-train", "64", "--steps", "3", "--batch-size", "8",
            "--out", str(ld), "--device", "cpu", "--set", f"autoencoder={vq / 'checkpoint.pt'}",
            "--set", "channels=8", "--set", "text_n_embd=8", "--set", "text_n_head=2",
            "--set", "transformer_heads=2", "--set", "transformer_dim_head=4", "--set", "sample_steps=2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "frozen" in out and "3 steps" in out
    model, ckpt = cli.load_model(ld / "checkpoint.pt")
    assert ckpt["step"] == 3 and model.config.diffusion["unet"]["channels"] == 8
    assert model.scale_factor is not None and model.config.latent_shape == (4, 8, 8)
    assert list((tmp_path / "cache" / "latents").glob("shapes-n64-*.pt"))  # the latents were cached once
    # sampling with a prompt; the same seed gives the same PNG
    pngs = []
    for name in ("a.png", "b.png"):
        png = tmp_path / name
        assert cli.main(["sample", str(ld), "--prompt", "a small red circle on a blue background",
                         "--guidance", "3", "--steps", "2", "--seed", "0", "--n", "4", "--out", str(png)]) == 0
        pngs.append(png.read_bytes())
    assert pngs[0] == pngs[1]
    # --sampler reaches the latent model: Heun on 3 Karras sigmas is 5 network evaluations
    from minigen import checkpoint

    calls, real_load = [], checkpoint.load_model

    def counting_load(path, device="cpu"):
        m, c = real_load(path, device)
        m.unet.register_forward_hook(lambda *a: calls.append(1))
        return m, c

    monkeypatch.setattr(checkpoint, "load_model", counting_load)
    assert cli.main(["sample", str(ld), "--prompt", "a small red circle on a blue background", "--guidance", "3",
                     "--sampler", "heun", "--steps", "3", "--n", "2", "--out", str(tmp_path / "heun.png")]) == 0
    assert len(calls) == 5
    monkeypatch.setattr(checkpoint, "load_model", real_load)
    capsys.readouterr()
    assert cli.main(["sample", str(ld), "--sampler", "euler", "--n", "1", "--out", str(tmp_path / "e.png")]) == 2
    assert "unknown sampler 'euler'" in capsys.readouterr().err
    # an unknown word: a warning naming it, and still an image
    capsys.readouterr()
    png = tmp_path / "dog.png"
    assert cli.main(["sample", str(ld), "--prompt", "a small red dog", "--steps", "2", "--n", "2",
                     "--out", str(png)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "'dog'" in err and png.exists()
    # a prompt longer than the tokenizer's limit: a clear error, exit 2
    assert cli.main(["sample", str(ld), "--prompt", " ".join(["red"] * 20), "--n", "1",
                     "--out", str(tmp_path / "long.png")]) == 2
    assert "max_length" in capsys.readouterr().err


def test_ema_checkpoint_with_buffers_loads(tmp_path):
    """load_model takes the EMA parameters and buffers, and the model's other buffers."""
    from minigen import data, train, vqgan

    model = vqgan.build(dict(ch=8, z_channels=8, code_dim=4, num_codes=16, perceptual="none"), (3, 32, 32))
    train.fit(model, data.make_shapes(16), steps=2, batch_size=8, ema_decay=0.5, progress=False,
              out_dir=str(tmp_path), log_every=0)
    loaded, ckpt = cli.load_model(tmp_path / "checkpoint.pt")
    for k, v in ckpt["ema"]["shadow"].items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.quantize.cluster_size, ckpt["ema"]["buffers"]["quantize.cluster_size"])
