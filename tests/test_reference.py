"""The shipped reference checkpoints (minigen.reference): present, intact, small, loadable,
rebuildable, and their recorded metrics reproducible."""
import hashlib
import json
import shutil

import pytest
import torch

from minigen import reference

MANIFEST = reference.manifest()
SHIPPED = list(MANIFEST["models"])
REQUIRED_KEYS = {"file", "sha256", "bytes", "params", "command", "config", "train_steps", "train_seconds",
                 "train_cpu_seconds", "metrics", "torch_version", "minigen_version", "date"}


def test_manifest_lists_only_known_models_with_full_records():
    assert SHIPPED, "no reference checkpoints are shipped"
    for name, entry in MANIFEST["models"].items():
        assert name in reference.NAMES
        assert REQUIRED_KEYS <= set(entry), f"{name}: missing {REQUIRED_KEYS - set(entry)}"
        assert entry["command"].startswith(f"{reference.COMMAND} --only {name}")
        assert not entry["quick"], f"{name} was shipped from a --quick run"
        assert entry["metrics"], f"{name} has no metrics"


def test_every_family_is_shipped():
    missing = [n for n in reference.NAMES if n not in SHIPPED]
    assert not missing, f"reference checkpoints missing: {missing}; run `python -m minigen.reference --only {' '.join(missing)}`"


def test_sizes_match_and_fit_the_budget():
    total = 0
    for name, entry in MANIFEST["models"].items():
        p = reference.path(name)
        assert p.stat().st_size == entry["bytes"], name
        total += entry["bytes"]
    assert total <= reference.MAX_TOTAL_BYTES, f"{total / 1e6:.1f} MB > 20 MB"
    assert MANIFEST["total_bytes"] == total


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_with_matching_sha(name):
    p = reference.path(name)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == MANIFEST["models"][name]["sha256"]
    model = reference.load(name)
    assert not model.training
    params = list(model.parameters())
    assert all(q.dtype == torch.float32 for q in params), "load must restore float32"
    assert all(torch.isfinite(q).all() for q in params)
    # trainable parameters as counted by the manifest (frozen helper nets excluded from neither side)
    assert sum(q.numel() for q in params) == MANIFEST["models"][name]["params"]
    # the stored float16 values come back exactly (float16 -> float32 is lossless)
    stored = torch.load(p, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        if k in stored and stored[k].dtype == torch.float16:
            assert torch.equal(v, stored[k].float()), k
            break


def _corrupt_copy(tmp_path, name):
    src = reference.path(name).parent
    dst = tmp_path / "ref"
    dst.mkdir()
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    shutil.copy(src / MANIFEST["models"][name]["file"], dst / MANIFEST["models"][name]["file"])
    return dst


def test_corrupt_copy_gives_a_clear_error(tmp_path):
    name = SHIPPED[0]
    root = _corrupt_copy(tmp_path, name)
    f = root / MANIFEST["models"][name]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(reference.ReferenceError, match=rf"sha256.*python -m minigen.reference --only {name}"):
        reference.load(name, root=root)


def test_missing_file_and_unknown_name(tmp_path):
    name = SHIPPED[0]
    root = _corrupt_copy(tmp_path, name)
    (root / MANIFEST["models"][name]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing.*--only {name}"):
        reference.load(name, root=root)
    with pytest.raises(ValueError, match="unknown reference model"):
        reference.load("gan")
    with pytest.raises(FileNotFoundError, match="python -m minigen.reference"):
        reference.manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("name", SHIPPED)
def test_metrics_were_measured_on_the_test_images_this_minigen_draws(name):
    """If the generator draws other test images, every recorded figure moves a little (FD,
    PSNR, accuracies): name that cause before a figure comparison fails for it."""
    from minigen import data

    test = data.load_dataset(reference.DATASET, split="test", n=reference.N_EVAL)
    assert MANIFEST["models"][name].get("test_images_sha256") == reference.images_sha256(test.images), (
        f"{name}'s metrics were measured on other test images; re-measure them with "
        f"`python -m minigen.reference --evaluate --only {name}`")


def test_recorded_reconstruction_psnr_is_reproducible():
    """The manifest's figures were measured on the loaded file: recomputing one must agree."""
    from minigen import data, metrics

    name = next((n for n in ("vqvae", "vqgan", "vae") if n in SHIPPED), None)
    if name is None:
        pytest.skip("no autoencoder shipped")
    n = reference.N_EVAL
    x, _ = data.load_dataset("shapes", split="test", n=n).tensors()
    model = reference.load(name)
    with torch.no_grad():
        x_hat = torch.cat([model.reconstruct(xb) for xb in x.split(250)])
    psnr = float(metrics.psnr(x_hat, x).mean())
    assert psnr == pytest.approx(MANIFEST["models"][name]["metrics"]["recon_psnr_db"], abs=1e-3)


def test_quick_smoke_run_into_tmp(tmp_path, capsys):
    out = tmp_path / "quick"
    assert reference.main(["--quick", "--only", "vae", "--out", str(out)]) == 0
    m = reference.manifest(out)
    assert list(m["models"]) == ["vae"] and m["models"]["vae"]["quick"]
    assert m["models"]["vae"]["train_steps"] == reference.QUICK["steps"]
    assert isinstance(m["models"]["vae"]["final_loss"], float)
    model = reference.load("vae", root=out)
    assert model.sample(2).shape == (2, 3, 32, 32)
    assert "[vae]" in capsys.readouterr().out


def test_evaluate_re_measures_without_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "quick"
    assert reference.main(["--quick", "--only", "vqvae", "--out", str(out)]) == 0
    before = reference.manifest(out)["models"]["vqvae"]
    p = out / before["file"]
    sha, mtime = before["sha256"], p.stat().st_mtime_ns
    m = json.loads((out / "manifest.json").read_text())
    m["models"]["vqvae"]["metrics"]["recon_psnr_db"] = -1.0          # a stale figure
    (out / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(reference, "TRAINERS", {})                    # evaluating must not train
    assert reference.main(["--evaluate", "--only", "vqvae", "--out", str(out)]) == 0
    after = reference.manifest(out)["models"]["vqvae"]
    assert after["metrics"] == before["metrics"]                      # deterministic: the same figures again
    assert after["train_seconds"] == before["train_seconds"] and after["date"] == before["date"]
    assert after["evaluated"]["command"] == "python -m minigen.reference --evaluate --only vqvae"
    assert p.stat().st_mtime_ns == mtime and reference.manifest(out)["models"]["vqvae"]["sha256"] == sha
    assert "recon_psnr_db" in capsys.readouterr().out                 # the changed figure is reported
    with pytest.raises(SystemExit) as e:
        reference.main(["--evaluate", "--only", "ddpm", "--out", str(out)])
    assert e.value.code == 2 and "re-measures existing checkpoints" in capsys.readouterr().err


def test_prior_without_its_autoencoder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reference.main(["--quick", "--only", "vqvae_prior", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "needs the reference vqvae" in capsys.readouterr().err


# the families whose manifest records a cheap, recomputable figure: their objective on the
# first 256 test images at seeded times and noise (see reference.flow_test_loss / latent_test_loss)
RECOMPUTABLE = {"flow": "test_flow_loss", "ldm_flow": "test_latent_loss"}


@pytest.mark.parametrize("name", [n for n in RECOMPUTABLE if n in SHIPPED])
def test_recorded_test_loss_of_the_flow_families_is_reproducible(name):
    """The shipped file, loaded, gives its manifest's figure again: same weights, same
    config (objective, backbone, time scale), same data. float32 on any CPU: 1e-4 relative."""
    from minigen import data, flow, ldm

    test = data.load_dataset(reference.DATASET, split="test", n=reference.N_EVAL)
    x, y = test.tensors()
    model = reference.load(name)
    with torch.no_grad():
        if name == "flow":
            assert isinstance(model, flow.FlowMatching) and model.num_classes == len(test.classes)
            got = reference.flow_test_loss(model, x, y)
        else:
            assert isinstance(model, ldm.LatentDiffusion) and model.config.objective == "flow"
            assert model.config.backbone == "dit"
            got = reference.latent_test_loss(model, x, test.captions)
    assert got == pytest.approx(MANIFEST["models"][name]["metrics"][RECOMPUTABLE[name]], rel=1e-4)


@pytest.mark.parametrize("name,sampler", [("flow", "heun"), ("ldm_flow", "dpmsolver++")])
def test_minigen_sample_runs_on_the_flow_references(name, sampler, tmp_path):
    from minigen import cli

    if name not in SHIPPED:
        pytest.fail(f"{name} is not shipped")
    png = tmp_path / "s.png"
    args = ["sample", str(reference.path(name)), "--sampler", sampler, "--steps", "2", "--n", "2", "--out", str(png)]
    if name == "ldm_flow":
        args += ["--prompt", "a small red circle on a blue background"]
    assert cli.main(args) == 0 and png.stat().st_size > 0
