import pytest
import torch

from minigen.autoencoder import AutoEncoder, AutoEncoderConfig, build


def test_shapes_and_range():
    m = AutoEncoder(AutoEncoderConfig(in_channels=1, image_size=28, channels=8, latent_channels=4))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z = m.encode(x)
    assert z.shape == (3, 4, 7, 7)
    y = m(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert m.compression == pytest.approx(28 * 28 / (4 * 49))


def test_learner_parts_are_used():
    calls = []

    def my_loss(x_hat, x):
        calls.append(1)
        return (x_hat - x).abs().mean()

    m = AutoEncoder(AutoEncoderConfig(channels=8), loss_fn=my_loss)
    out = m.training_loss((torch.zeros(2, 3, 32, 32), torch.zeros(2)), 0)
    assert calls and out["loss"].requires_grad


def test_wrong_input_shape_message():
    m = AutoEncoder(AutoEncoderConfig(channels=8))
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        m(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        AutoEncoder(AutoEncoderConfig(image_size=30))


def test_build_from_dataset_shape():
    m = build({"channels": 8}, (1, 28, 28), 10)
    assert m.config.in_channels == 1 and m.config.image_size == 28
