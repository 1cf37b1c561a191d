"""Judge networks: small classifiers that score generated images offline.

FID needs Inception-v3 weights, which a learner without internet cannot download. minigen
ships instead one small CNN per built-in dataset, trained by `scripts/train_judges.py`
(weights in minigen/weights/, ~0.6 MB each, with their test accuracy and real-vs-real
baselines in judges.json). A judge gives us

* ``judge.features(x)``: the penultimate activations (global-average-pooled last conv
  block), the feature space for Frechet distance and KID. We call the result
  "FD-shapes" / "FD-digits"; it measures the same thing as FID, on a different scale;
* ``judge.predict(x)``: class labels, for `minigen.metrics.conditional_accuracy`
  (does "red circle" produce a red circle?);
* ``judge.feature_maps(x)``: every stage's activations, for a perceptual distance.

`shapes` has two heads, shape (3 classes) and colour (6); the combined label is
shape * 6 + colour, as in minigen.data. `digits` has one head, the digit.

Inputs are images in [-1, 1] at the dataset's native size: 3x32x32 (shapes) or
1x28x28 (digits).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from minigen import metrics
from minigen.checkpoint import file_sha256

Tensor = torch.Tensor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FORMAT = "minigen-judge-v1"


@dataclass
class JudgeConfig:
    dataset: str  # the built-in dataset it judges: "shapes" | "digits"
    in_channels: int
    image_size: int
    # head name -> number of classes, in the order of the combined label's digits
    heads: dict[str, int] = field(default_factory=dict)
    widths: tuple[int, ...] = (16, 32, 64)  # two 3x3 convs per stage, 2x2 max-pool between
    feature_dim: int = 128  # width of the last conv block = length of a feature vector


JUDGE_CONFIGS = {
    "shapes": JudgeConfig("shapes", in_channels=3, image_size=32, heads={"shape": 3, "color": 6}),
    "digits": JudgeConfig("digits", in_channels=1, image_size=28, heads={"digit": 10}),
}


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # BatchNorm makes a tiny CNN train in one or two epochs; a judge is always used in
    # eval mode, where BN is a fixed affine map and a feature never depends on the batch.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """A small VGG-style CNN classifier with one linear head per label attribute."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        if not config.heads:
            raise ValueError("JudgeConfig.heads must name at least one head, e.g. {'digit': 10}")
        self.config = config
        stages, cin = [], config.in_channels
        for i, w in enumerate(config.widths):
            layers = [_conv_bn_relu(cin, w), _conv_bn_relu(w, w)]
            if i > 0:  # pool before every stage but the first: 32 -> 16 -> 8 (28 -> 14 -> 7)
                layers.insert(0, nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            cin = w
        stages.append(nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(cin, config.feature_dim)))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, n) for name, n in config.heads.items()})

    # -- inputs ----------------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        from minigen.data import check_images  # late import: data.py is heavy-ish and optional here

        c = self.config
        check_images(x, channels=c.in_channels, size=c.image_size, name=f"images for the {c.dataset} judge")

    # -- the network -----------------------------------------------------------------------
    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """Activations after each stage, from (N, 16, H, W) down to (N, feature_dim, H/8, W/8)."""
        self._check(x)
        x = x.to(next(self.parameters()).device)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim): the last block's activations, averaged over space.

        Differentiable with respect to x. For thousands of images use `extract_features`,
        which batches and skips the autograd graph.
        """
        return self.feature_maps(x)[-1].mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per head, e.g. {"shape": (N, 3), "color": (N, 6)}."""
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}

    # -- labels ----------------------------------------------------------------------------
    def combine_labels(self, head_labels: dict[str, Tensor]) -> Tensor:
        """Per-head labels -> the dataset's single label (shapes: shape * 6 + colour)."""
        label = None
        for name, n in self.config.heads.items():
            part = head_labels[name].long()
            label = part if label is None else label * n + part
        return label

    def split_labels(self, labels: Tensor) -> dict[str, Tensor]:
        """The dataset's single label -> per-head labels (the inverse of `combine_labels`)."""
        labels = torch.as_tensor(labels).long()
        out = {}
        for name, n in reversed(list(self.config.heads.items())):
            out[name] = labels % n
            labels = torch.div(labels, n, rounding_mode="floor")
        return dict(reversed(list(out.items())))

    @torch.no_grad()
    def predict_heads(self, x: Tensor) -> dict[str, Tensor]:
        """Most likely class per head, e.g. {"shape": (N,), "color": (N,)}, int64 on CPU."""
        return {name: logits.argmax(1).cpu() for name, logits in self(x).items()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Most likely dataset label (N,), int64 on CPU (shapes: shape * 6 + colour)."""
        return self.combine_labels(self.predict_heads(x))


# ----------------------------------------------------------------------------------------
# Shipped weights
# ----------------------------------------------------------------------------------------


def judge_info() -> dict:
    """Contents of minigen/weights/judges.json: accuracy, baselines, provenance per judge."""
    path = WEIGHTS_DIR / "judges.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall minigen or run scripts/train_judges.py")
    return json.loads(path.read_text())


def save_judge(judge: Judge, path) -> None:
    """Write a judge as a plain dict of tensors and primitives (loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "config": {**asdict(judge.config), "widths": list(judge.config.widths)},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a weights file behind


def load_judge(name: str, *, path=None, device="cpu", verify: bool = True) -> Judge:
    """Load a trained judge, frozen and in eval mode.

    Args:
        name: "shapes" or "digits".
        path: a weights file written by `save_judge`; defaults to the shipped
            minigen/weights/judge_<name>.pt.
        device: where to put it.
        verify: check the shipped file's sha256 against judges.json (catches a corrupt or
            stale file, whose scores would silently differ from the recorded baselines).
    """
    if name not in JUDGE_CONFIGS:
        raise ValueError(
            f"no judge for dataset {name!r}; judges exist for {sorted(JUDGE_CONFIGS)} "
            "(train one on your own data with scripts/train_judges.py as a template)"
        )
    shipped = path is None
    path = Path(path) if path is not None else WEIGHTS_DIR / f"judge_{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"judge weights {path} not found; run `python scripts/train_judges.py` to create them")
    if shipped and verify:
        info = judge_info().get(name, {})
        expected = info.get("sha256")
        if expected is not None and file_sha256(path) != expected:
            raise ValueError(
                f"{path} does not match the sha256 recorded in judges.json: the file is corrupt or "
                "from another training run; reinstall minigen or re-run scripts/train_judges.py"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise ValueError(f"could not read judge weights from {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a minigen judge weights file (expected format {WEIGHTS_FORMAT!r})")
    cfg = dict(payload["config"])
    cfg["widths"] = tuple(cfg["widths"])
    config = JudgeConfig(**cfg)
    if config.dataset != name:
        raise ValueError(f"{path} holds the judge for {config.dataset!r}, not {name!r}")
    judge = Judge(config)
    judge.load_state_dict(payload["state_dict"])
    judge.eval().requires_grad_(False)
    return judge.to(device)


# ----------------------------------------------------------------------------------------
# Scoring sets of images
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(judge: Judge, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """Judge features of many images, in batches, as float32 (N, feature_dim) on CPU."""
    was_training = judge.training
    judge.eval()
    try:
        batches = range(0, len(images), batch_size)
        return torch.cat([judge.features(images[i : i + batch_size]).float().cpu() for i in batches])
    finally:
        judge.train(was_training)


_reference_cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
_judge_cache: dict[str, Judge] = {}


def _cached_judge(name: str) -> Judge:
    if name not in _judge_cache:
        _judge_cache[name] = load_judge(name)
    return _judge_cache[name]


def reference_statistics(name: str, n: int) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of the judge features of the first n images of the test split (cached)."""
    key = (name, n)
    if key not in _reference_cache:
        from minigen.data import load_dataset

        # n= generates (or reads) only the prefix; data.py raises a clear error if n is too big
        x, _ = load_dataset(name, split="test", n=n).tensors()
        _reference_cache[key] = metrics.feature_statistics(extract_features(_cached_judge(name), x))
    return _reference_cache[key]


def fd_score(name: str, fake_images: Tensor, real_images: Tensor | None = None, *, n: int | None = None) -> float:
    """Frechet distance in the judge's feature space ("FD-shapes", "FD-digits").

    Args:
        name: the dataset/judge, "shapes" or "digits".
        fake_images: generated images (N, C, H, W) in [-1, 1] at the native size.
        real_images: the reference set; by default the first ``n`` test-split images.
        n: how many fake and reference images to use; defaults to all fake images (and
            as many test images). FD is biased upwards for small n, so compare models at
            the same n, and against the real-vs-real baseline at that n in judges.json.
    """
    n_fake = len(fake_images)
    n = n_fake if n is None else n
    if n > n_fake:
        raise ValueError(f"n={n} but only {n_fake} fake images were given")
    if n < 2:
        raise ValueError(f"FD needs at least 2 images per set, got n={n}")
    judge = _cached_judge(name)
    fake_stats = metrics.feature_statistics(extract_features(judge, fake_images[:n]))
    if real_images is None:
        real_stats = reference_statistics(name, n)
    else:
        real_stats = metrics.feature_statistics(extract_features(judge, real_images[:n]))
    return metrics.frechet_distance(fake_stats, real_stats)
