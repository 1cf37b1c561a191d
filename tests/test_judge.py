"""The shipped judge networks and the judge-feature metrics (FD, KID, precision/recall)."""

import copy
import hashlib

import pytest
import torch

from minigen import metrics
from minigen.data import load_dataset
from minigen.judge import WEIGHTS_DIR, extract_features, fd_score, judge_info, load_judge

NAMES = ["shapes", "digits"]
N_TEST = 1000  # a prefix of the test split: fast to generate, enough for 0.1% accuracy steps
NOISE = (0.0, 0.1, 0.2, 0.4)  # std of Gaussian noise added to the second half


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
    """judge, test images and labels, and features computed once for the set tests:
    a = first 500 test images, noisy[s] = next 500 with noise of std s (clamped)."""
    name = request.param
    x, y = load_dataset(name, split="test", n=N_TEST).tensors()
    judge = load_judge(name)
    gen = torch.Generator().manual_seed(0)
    b = x[500:1000]
    noise = torch.randn(b.shape, generator=gen)
    feats = {"a": extract_features(judge, x[:500])}
    feats.update({s: extract_features(judge, (b + s * noise).clamp(-1, 1)) for s in NOISE})
    feats["junk"] = extract_features(judge, torch.rand(b.shape, generator=gen) * 2 - 1)  # uniform noise images
    return name, judge, x, y, feats


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
    name, judge, x, y, _ = setup
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
    name, judge, x, _, _ = setup
    f = extract_features(judge, x[:64], batch_size=16)
    assert f.shape == (64, judge.config.feature_dim) and f.dtype == torch.float32
    # an image's features do not depend on its batch (eval-mode BatchNorm)
    torch.testing.assert_close(judge.features(x[5:6]), f[5:6], rtol=1e-4, atol=1e-5)
    assert f.std(0).mean() > 0.01  # not collapsed to a constant

    perturbed = copy.deepcopy(judge)
    with torch.no_grad():
        w = perturbed.stages[1][1][0].weight  # stage 2: [MaxPool, conv-bn-relu, ...]
        w.add_(0.1 * w.std() * torch.randn_like(w))
    g = extract_features(perturbed, x[:64])
    assert (g - f).abs().max() > 1e-3
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())


def test_fd_self_zero_and_monotone_in_noise(setup):
    *_, feats = setup
    a = feats["a"]
    assert metrics.frechet_distance(a, a) < 1e-6
    fds = [metrics.frechet_distance(a, feats[s]) for s in NOISE]
    assert all(u < v for u, v in zip(fds, fds[1:])), fds
    assert fds[-1] > 10 * fds[0]


def test_kid_and_precision_recall_on_real_and_noisy_sets(setup):
    *_, feats = setup
    a, b = feats["a"], feats[0.0]
    mean, std = metrics.kid(a, b, subset_size=250, num_subsets=50)
    assert abs(mean) < 2 * std, (mean, std)  # same distribution: indistinguishable from 0
    mean_n, std_n = metrics.kid(a, feats[0.2], subset_size=250, num_subsets=50)
    assert mean_n > 5 * std_n and mean_n > 10 * abs(mean), (mean_n, std_n, mean)

    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    p, r = metrics.precision_recall(a, b)
    assert p > 0.7 and r > 0.7  # two real samples cover each other
    p, r = metrics.precision_recall(a, feats["junk"])
    assert p < 0.05 and r < 0.05, (p, r)


def test_fd_score_uses_the_test_split_by_default(setup):
    name, judge, x, _, _ = setup
    fake = x[500:700]
    f_fake = extract_features(judge, fake)
    manual = metrics.frechet_distance(f_fake, extract_features(judge, x[:200]))
    assert fd_score(name, fake) == pytest.approx(manual, rel=1e-6)
    other = x[200:400]
    assert fd_score(name, fake, other) == pytest.approx(
        metrics.frechet_distance(f_fake, extract_features(judge, other)), rel=1e-6)
    with pytest.raises(ValueError, match="n="):
        fd_score(name, fake, n=300)


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
