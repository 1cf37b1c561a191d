"""Perceptual distance: compare images in a trained network's feature space, not pixel by pixel.

An L1/L2 reconstruction loss is minimised by the *average* of all plausible images, which is
blurry. A perceptual loss compares what a trained network sees in the two images (edges,
corners, textures), so a sharp reconstruction shifted by half a pixel costs little while a
blurred one costs a lot. VQGAN (Esser et al. 2021) adds LPIPS (Zhang et al. 2018, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric") to its L1 loss.

LPIPS needs ImageNet-trained VGG/AlexNet weights plus a learned linear layer per feature
map, none of which can be downloaded offline. minigen's default is therefore an
*LPIPS-style distance in the feature space of the judge network* (minigen.judge), a small
CNN trained on the built-in data and shipped with the package:

    for each stage l of the judge (feature maps f_l of shape (N, C_l, H_l, W_l)):
        f_hat = f_l / ||f_l||_2 over channels          (unit length at every pixel)
        d_l   = spatial mean of sum over channels (f_hat(x) - f_hat(y))^2
    d(x, y) = mean over stages of d_l                  (one number per image, in [0, 4])

This is the LPIPS formula with *unit* channel weights (LPIPS learns them from human
judgements, and we have none) and a mean over layers instead of a sum (so the value does not
grow with the number of stages). The judge is frozen: it stays in eval mode whatever mode its
parent module is put in, its weights never get gradients, and gradients flow to the images.

The judge is picked by channel count: the `shapes` judge (3x32x32) for RGB, the `digits`
judge (1x28x28) for grayscale. Images of another size are resized (bilinear, antialiased)
to the judge's size first, which is fine for small images but throws detail away for big
ones; pass resize=False to get an error instead. Features of a judge trained on shapes are
less meaningful on photographs: for real data, use `LPIPS` with weights you have.

`LPIPS(weights_path)` wraps the `lpips` package when it is installed and you have its
weights on disk (nothing is ever downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# channel count -> the built-in judge used for it
JUDGE_FOR_CHANNELS = {3: "shapes", 1: "digits"}


def normalize_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Scale every feature vector f[n, :, i, j] to unit L2 length (LPIPS' normalisation).

    F.normalize divides by max(||f||, eps); its gradient is finite where a whole feature
    vector is zero (common after a ReLU), unlike f / sqrt(sum f^2), which gives 0 * inf = NaN.
    """
    return F.normalize(f, p=2.0, dim=1, eps=eps)


def feature_distance(feats_x: list[Tensor], feats_y: list[Tensor]) -> Tensor:
    """LPIPS-style distance between two lists of feature maps, one value per image (N,).

    Per layer: channel-normalise, squared difference summed over channels, mean over
    space. Then the mean over layers (unit weights).
    """
    if len(feats_x) != len(feats_y) or not feats_x:
        raise ValueError(f"need two equally long, non-empty lists of feature maps, got {len(feats_x)} and {len(feats_y)}")
    per_layer = []
    for fx, fy in zip(feats_x, feats_y):
        diff = (normalize_channels(fx) - normalize_channels(fy)).pow(2).sum(dim=1)  # (N, H, W)
        per_layer.append(diff.mean(dim=(1, 2)))
    return torch.stack(per_layer).mean(dim=0)


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class PerceptualLoss(nn.Module):
    """Deep-feature distance in a frozen judge network's feature space (see the module doc).

    Args:
        in_channels: channels of the images to compare (3 -> `shapes` judge, 1 -> `digits`).
        judge: None (the built-in judge for `in_channels`), a dataset name ("shapes",
            "digits"), or a judge module with a `config` (in_channels, image_size) and either
            `stages` (the sequence of blocks) or `feature_maps(x)`.
        resize: resize images of another size to the judge's size; if False such images
            raise a ValueError.

    forward(x, y) -> (N,) distances; x and y are (N, C, H, W) in [-1, 1] (a decoder's
    unclamped output a little outside that range is fine: the range is not checked here).
    """

    def __init__(self, in_channels: int = 3, judge=None, resize: bool = True):
        super().__init__()
        if judge is None or isinstance(judge, str):
            name = judge if judge is not None else JUDGE_FOR_CHANNELS.get(in_channels)
            if name is None:
                raise ValueError(
                    f"no built-in judge network for {in_channels}-channel images (there are judges for "
                    f"{sorted(JUDGE_FOR_CHANNELS)} channels: 3 -> 'shapes' at 32x32, 1 -> 'digits' at "
                    "28x28); use perceptual_weight=0 / perceptual='none', or LPIPS(weights_path)")
            from minigen.judge import load_judge  # late: the judge module loads weights from disk

            judge = load_judge(name)
        cfg = getattr(judge, "config", None)
        if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "image_size"):
            raise TypeError("judge must be a minigen.judge.Judge (or a module with .config.in_channels "
                            f"and .config.image_size), got {type(judge).__name__}")
        if cfg.in_channels != in_channels:
            raise ValueError(f"the judge takes {cfg.in_channels}-channel images but in_channels={in_channels}")
        self.in_channels = in_channels
        self.image_size = int(cfg.image_size)
        self.resize = resize
        self.net = _freeze(judge)

    def train(self, mode: bool = True):
        # The judge has BatchNorm: in train mode it would use batch statistics and overwrite
        # its running averages. It stays in eval mode even when the VQGAN around it trains.
        super().train(mode)
        self.net.eval()
        return self

    def _prepare(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PerceptualLoss: {name} must be a (N, C, H, W) tensor, got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"PerceptualLoss: {name} has {x.shape[1]} channel(s) but this loss compares "
                f"{self.in_channels}-channel images (built-in judges: 3 channels -> 'shapes', 1 -> 'digits'); "
                f"build PerceptualLoss(in_channels={x.shape[1]}) if a judge exists for that")
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            if not self.resize:
                raise ValueError(f"PerceptualLoss: {name} is {x.shape[-2]}x{x.shape[-1]} but the judge takes "
                                 f"{s}x{s} images; pass resize=True or resize the images")
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The judge's activations after every stage, differentiable with respect to x."""
        x = x.to(next(self.net.parameters()).device)
        stages = getattr(self.net, "stages", None)
        if stages is None:
            return list(self.net.feature_maps(x))
        # Run the stages ourselves: Judge.feature_maps checks the [-1, 1] range, which a
        # decoder's unclamped output may leave by a little.
        out = []
        for stage in stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape != y.shape:
            raise ValueError(f"PerceptualLoss: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = self._prepare(x, "x"), self._prepare(y, "y")
        # one pass over both batches (the judge is in eval mode, so no batch statistics mix)
        feats = self.feature_maps(torch.cat([x, y]))
        n = x.shape[0]
        return feature_distance([f[:n] for f in feats], [f[n:] for f in feats])


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) through the `lpips` package, from a weights file on disk.

    Nothing is downloaded: `weights_path` must hold the state_dict of a whole
    ``lpips.LPIPS(net=net)`` module (trunk and linear layers), e.g. saved on a machine that has
    the weights with ``torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pt")``.

    forward(x, y) -> (N,) distances for images in [-1, 1].
    """

    def __init__(self, weights_path, net: str = "vgg"):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weights {path} not found. minigen never downloads them: save the state_dict of "
                f"lpips.LPIPS(net={net!r}) to that path on a machine that has the weights, or use the "
                "offline default minigen.perceptual.PerceptualLoss")
        try:
            import lpips
        except ImportError as e:
            raise ImportError(
                "LPIPS needs the `lpips` package (and torchvision): pip install lpips. "
                "Without it, use the offline default minigen.perceptual.PerceptualLoss") from e
        # pretrained=False / pnet_rand=True: build the architecture without fetching any weights
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a state_dict of lpips.LPIPS(net={net!r}): {e}") from None
        self.net = _freeze(model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # dropout in LPIPS' linear layers stays off
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y).reshape(x.shape[0])


def build_perceptual(kind: str, in_channels: int, lpips_path=None) -> nn.Module | None:
    """The perceptual loss a VQGAN config asks for: "judge" (default), "lpips" or "none" (None)."""
    if kind == "judge":
        return PerceptualLoss(in_channels)
    if kind == "lpips":
        if lpips_path is None:
            raise ValueError("perceptual='lpips' needs lpips_path=<a saved lpips.LPIPS state_dict>")
        return LPIPS(lpips_path)
    if kind == "none":
        return None
    raise ValueError(f"perceptual must be 'judge', 'lpips' or 'none', got {kind!r}")


__all__ = ["normalize_channels", "feature_distance", "PerceptualLoss", "LPIPS", "build_perceptual",
           "JUDGE_FOR_CHANNELS"]
