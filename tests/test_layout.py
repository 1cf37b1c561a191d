"""The module split: moved names stay importable, and the small shared helpers behave."""

import dataclasses

import pytest
import torch

from minigen import builtin_data, checkpoint, cli, data, downloads, evaluate, optim, rundir, runtime, train
from minigen.course import (check_cells, execute, feedback, grader, integrity, probe, results,
                            submissions)
from minigen.autoencoder import AutoEncoder, AutoEncoderConfig


def test_moved_names_are_the_same_objects_from_their_old_module():
    for name in ("make_shapes", "make_digits", "SHAPE_NAMES", "COLOR_NAMES", "shapes_caption", "shapes_label"):
        assert getattr(data, name) is getattr(builtin_data, name)
    for name in ("read_idx", "read_cifar_batch", "DownloadError"):
        assert getattr(data, name) is getattr(downloads, name)
    for name in data.__all__:
        assert getattr(data, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        data.no_such_name
    assert train.select_device is runtime.select_device and train.set_seed is runtime.set_seed
    assert train.load_checkpoint is checkpoint.load_checkpoint and train.CheckpointError is checkpoint.CheckpointError
    for name in ("RunLockedError", "LOCK_NAME", "LOG_NAME", "read_log"):
        assert getattr(train, name) is getattr(rundir, name)
    assert train._read_log is rundir.read_log
    for name in ("lr_factor", "default_optimizer"):
        assert getattr(train, name) is getattr(optim, name)
    for name in train.__all__:
        assert getattr(train, name) is not None


@pytest.mark.parametrize("home, names", [
    (submissions, ["Source", "load_sources", "check_aliases", "Submission", "collect", "identify",
                   "MetadataError", "plan_cells"]),
    (execute, ["GRACE_S", "MAX_RESTARTS", "LINE_CAP", "run_notebook"]),
    (integrity, ["static_references"]),
    (results, ["ExerciseGrade", "NotebookGrade"]),
    (feedback, ["feedback_markdown"]),
])
def test_grader_names_are_the_same_objects_from_their_new_homes(home, names):
    for name in names:
        assert getattr(grader, name) is getattr(home, name), name


def test_probe_names_are_the_same_objects_from_their_new_homes():
    assert probe.reference_report is integrity.reference_report
    assert probe.parse_check_cell is check_cells.parse_check_cell
    assert probe.CheckCellError is check_cells.CheckCellError


def _saved_autoencoder(tmp_path, **header):
    torch.manual_seed(1)
    model = AutoEncoder(AutoEncoderConfig(in_channels=1, image_size=8, channels=4, latent_channels=2))
    state = {**checkpoint.model_header(model), "model": model.state_dict(), "ema": None, **header}
    checkpoint.save_checkpoint(tmp_path / checkpoint.CHECKPOINT_NAME, state)
    return model


def test_load_model_from_a_run_folder_rebuilds_the_same_model(tmp_path):
    model = _saved_autoencoder(tmp_path)
    loaded, ckpt = checkpoint.load_model(tmp_path)  # the folder means its checkpoint.pt
    assert type(loaded) is AutoEncoder and not loaded.training
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert ckpt["model_class"] == "minigen.autoencoder.AutoEncoder"
    loaded_cli, _ = cli.load_model(tmp_path / "checkpoint.pt")
    assert type(loaded_cli) is AutoEncoder


@pytest.mark.parametrize("header, message", [
    ({"model_class": "minigen.nowhere.Model"}, "minigen.nowhere.Model"),
    ({"model_config": None}, "no model config"),
])
def test_rebuild_says_what_is_missing(tmp_path, header, message):
    _saved_autoencoder(tmp_path, **header)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_model(tmp_path)


def test_image_config_checks_and_layers_defaults_under_overrides():
    @dataclasses.dataclass
    class ToyConfig:
        in_channels: int = 3
        image_size: int = 32
        width: int = 8

    cfg = cli.image_config(ToyConfig, {"width": 5}, (1, 12, 12), width=7)
    assert (cfg.in_channels, cfg.image_size, cfg.width) == (1, 12, 5)      # overrides beat defaults
    assert cli.image_config(ToyConfig, None, (3, 6, 6), width=7).width == 7
    with pytest.raises(ValueError, match="Toy needs square images, got 8x6"):
        cli.image_config(ToyConfig, {}, (3, 8, 6))
    with pytest.raises(TypeError, match=r"unknown Toy option\(s\) \['depth'\]"):
        cli.image_config(ToyConfig, {"depth": 2}, (3, 8, 8))


def test_evaluate_batches_and_timing():
    calls = []
    out = evaluate.in_batches(lambda i, k: (calls.append((i, k)), torch.arange(i, i + k))[1], 10, 4)
    assert calls == [(0, 4), (4, 4), (8, 2)] and torch.equal(out, torch.arange(10))
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 3
    y, seconds = evaluate.timed(lambda: x)
    assert y.dtype == torch.float32 and y.abs().max() <= 1 and seconds >= 0
    assert torch.equal(y, x.clamp(-1, 1).float())


def test_derive_seed_is_a_fixed_function_of_its_parts():
    a = runtime.derive_seed(3, "epoch", 7)
    assert a == runtime.derive_seed(3, "epoch", 7) and 0 <= a < 2**63
    assert a != runtime.derive_seed(3, "epoch", 8) and a != runtime.derive_seed(4, "epoch", 7)
