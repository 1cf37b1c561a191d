"""The shipped judge networks and the judge-feature metrics (FD, KID, precision/recall)."""

import copy
import hashlib

import pytest
import torch

from minigen import metrics
from minigen.data import load_dataset
from minigen.judge import WEIGHTS_DIR, extract_features, fd_score, judge_info, load_judge

NAMES = ["shapes", "digits"]
N_TEST = 2000  # a prefix of the test split: fast to generate, enough for 0.1% accuracy steps


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
    name = request.param
    x, y = load_dataset(name, split="test", n=N_TEST).tensors()
    return name, load_judge(name), x, y


def test_shipped_weights_are_small_and_match_their_record():
    info = judge_info()
    for name in NAMES:
        path = WEIGHTS_DIR / f"judge_{name}.pt"
        data = path.read_bytes()
        assert len(data) <= 1_000_000, f"{path} is {len(data)} bytes"
        assert hashlib.sha256(data).hexdigest() == info[name]["sha256"]
        for key in ("command", "seed", "date", "torch_version", "test_accuracy", "real_vs_real"):
            assert key in info[name], key
        # loads as plain tensors, i.e. with weights_only=True
        torch.load(path, weights_only=True)


def test_judge_reaches_recorded_accuracy(setup):
    name, judge, x, y = setup
    recorded = judge_info()[name]["test_accuracy"]
    acc = metrics.conditional_accuracy(judge, x, y)
    assert recorded >= 0.99
    assert acc >= 0.99 and acc >= recorded - 0.005, (name, acc, recorded)
    if name == "shapes":  # the heads are the dataset's shape and colour attributes
        ds = load_dataset("shapes", split="test", n=200)
        heads = judge.predict_heads(ds.tensors()[0])
        assert (heads["shape"] == ds.attributes["shape"]).double().mean() >= 0.99
        assert (heads["color"] == ds.attributes["color"]).double().mean() >= 0.99
        torch.testing.assert_close(judge.combine_labels(judge.split_labels(y)), y)


def test_features_are_per_image_and_depend_on_the_weights(setup):
    name, judge, x, _ = setup
    f = extract_features(judge, x[:64], batch_size=16)
    assert f.shape == (64, judge.config.feature_dim) and f.dtype == torch.float32
    # an image's features do not depend on its batch (eval-mode BatchNorm)
    torch.testing.assert_close(judge.features(x[5:6]), f[5:6], rtol=1e-4, atol=1e-5)
    assert f.std(0).mean() > 0.01  # not collapsed to a constant

    perturbed = copy.deepcopy(judge)
    with torch.no_grad():
        w = perturbed.stages[1][0][0].weight
        w.add_(0.1 * w.std() * torch.randn_like(w))
    g = extract_features(perturbed, x[:64])
    assert (g - f).abs().max() > 1e-3
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())


def test_fd_self_zero_and_monotone_in_noise(setup):
    name, judge, x, _ = setup
    real = extract_features(judge, x[:1000])
    assert metrics.frechet_distance(real, real) < 1e-6
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x[1000:2000].shape, generator=gen)
    fds = [metrics.frechet_distance(real, extract_features(judge, (x[1000:2000] + s * noise).clamp(-1, 1)))
           for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[-1] > 10 * fds[0]


def test_kid_and_precision_recall_on_real_and_noisy_sets(setup):
    name, judge, x, _ = setup
    a = extract_features(judge, x[:1000])
    b = extract_features(judge, x[1000:2000])
    mean, std = metrics.kid(a, b, subset_size=500, num_subsets=50)
    assert abs(mean) < 2 * std, (mean, std)  # same distribution: indistinguishable from 0
    gen = torch.Generator().manual_seed(1)
    noisy = extract_features(judge, (x[1000:2000] + 0.3 * torch.randn(x[1000:2000].shape, generator=gen)).clamp(-1, 1))
    mean_n, std_n = metrics.kid(a, noisy, subset_size=500, num_subsets=50)
    assert mean_n > 10 * std_n

    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    p, r = metrics.precision_recall(a, b)
    assert p > 0.5 and r > 0.5  # two real samples cover each other
    junk = extract_features(judge, torch.rand(x[:1000].shape, generator=gen) * 2 - 1)  # uniform noise images
    p, r = metrics.precision_recall(a, junk)
    assert p < 0.05 and r < 0.05, (p, r)


def test_fd_score_uses_the_test_split_by_default(setup):
    name, judge, x, _ = setup
    fake = x[1000:1500]
    manual = metrics.frechet_distance(extract_features(judge, fake), extract_features(judge, x[:500]))
    assert fd_score(name, fake) == pytest.approx(manual, rel=1e-6)
    assert fd_score(name, fake, x[500:1000]) == pytest.approx(
        metrics.frechet_distance(extract_features(judge, fake), extract_features(judge, x[500:1000])), rel=1e-6)
    with pytest.raises(ValueError, match="n="):
        fd_score(name, fake, n=600)


def test_judge_rejects_wrong_inputs():
    judge = load_judge("shapes")
    with pytest.raises(ValueError, match="channel"):
        judge.features(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        judge.features(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        judge.predict(torch.full((2, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="no judge"):
        load_judge("cifar10")
    with pytest.raises(ValueError, match="shapes"):
        load_judge("digits", path=WEIGHTS_DIR / "judge_shapes.pt")
