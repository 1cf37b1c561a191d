"""Checks for lesson 03 (VQGAN): the hinge discriminator loss and the generator loss, the
adaptive GAN weight, and the PatchGAN discriminator.

The references are written here, independently of minigen.vqgan: float64 formulas for the
losses, gradient norms taken on a small graph built by the check, and the PatchGAN's output
size and receptive field computed from the convolution arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.course.checks._framework import CheckFailed, Exercise, _fmt_shape, checker, show_hint

__all__ = ["hint", "gan_losses", "adaptive_weight", "patch_discriminator", "gan_losses_hidden"]


# ---------------------------------------------------------------------------- 3.1
def _logits(g, shape):
    # a spread of values on both sides of the hinge margins (|l| > 1 and |l| < 1 both occur)
    return (torch.randn(shape, generator=g) * 1.5 + 0.3 * torch.randn((), generator=g)).requires_grad_()


def _scalar(ex, out, what):
    if isinstance(out, torch.Tensor) and out.dim() != 0:
        ex.fail(f"{what} has shape {_fmt_shape(out.shape)}; a loss must be a single number (shape ())",
                mistake="average over every logit with .mean() (one logit per patch, per image)")
    return ex.tensor(out, shape=(), what=what)


def _hinge_d(ex, fn, lr, lf, case):
    before = (lr.detach().clone(), lf.detach().clone())
    out = _scalar(ex, ex.call(fn, lr, lf), "the discriminator loss" + case)
    if not (torch.equal(lr.detach(), before[0]) and torch.equal(lf.detach(), before[1])):
        ex.fail("your function changed the logits in place; use out-of-place operations")
    r, f = lr.detach().double(), lf.detach().double()
    relu = torch.relu
    ref = 0.5 * (relu(1 - r).mean() + relu(1 + f).mean())
    ex.close(out, ref, atol=1e-5, rtol=1e-5, what="the discriminator loss" + case, mistakes=[
        (0.5 * (relu(1 - r).mean() + relu(1 - f).mean()),
         "relu(1 - D) on the fakes too: a fake patch should be pushed *below* -1, so its term is relu(1 + D(x_hat))"),
        (0.5 * (relu(1 + r).mean() + relu(1 - f).mean()),
         "the signs are flipped: real patches should score >= +1 (relu(1 - D(x))), fakes <= -1 (relu(1 + D(x_hat)))"),
        (relu(1 - r).mean() + relu(1 + f).mean(), "the factor 1/2 is missing: 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))"),
        (0.5 * (relu(1 - r).sum() + relu(1 + f).sum()),
         "you summed over the logits; take the mean, so the loss does not grow with batch size and patch count"),
        (relu(1 - r).sum() + relu(1 + f).sum(), "you summed over the logits and dropped the 1/2; take 1/2 (mean + mean)"),
        (0.5 * ((1 - r).mean() + (1 + f).mean()),
         "the relu is missing: without it this is a linear loss that pushes D's logits without bound"),
        (0.5 * (relu(-r).mean() + relu(f).mean()), "the margin 1 is missing: relu(1 - D(x)) and relu(1 + D(x_hat))"),
        (0.5 * (F.softplus(-r).mean() + F.softplus(f).mean()),
         "that is the vanilla (softplus / cross-entropy) loss; the hinge loss uses relu(1 - D(x)) and relu(1 + D(x_hat))"),
    ])
    ex.gradients_flow(out, {"logits_real": lr, "logits_fake": lf}, what="the discriminator loss")


def _gen(ex, fn, lf, case):
    out = _scalar(ex, ex.call(fn, lf), "the generator loss" + case)
    f = lf.detach().double()
    ref = -f.mean()
    ex.close(out, ref, atol=1e-5, rtol=1e-5, what="the generator loss" + case, mistakes=[
        (f.mean(), "the sign is flipped: the generator wants D(x_hat) *high* (real-looking), so it minimises -mean D(x_hat)"),
        (-f.sum(), "you summed over the logits; take the mean"),
        (torch.relu(1 - f).mean(), "relu(1 - D(x_hat)) is the discriminator's hinge term for a real image; the generator "
                                   "loss has no margin: -mean D(x_hat)"),
        (F.softplus(-f).mean(), "that is the non-saturating cross-entropy loss; VQGAN (taming) uses -mean D(x_hat)"),
        (-0.5 * f.mean(), "no 1/2 here: the generator loss is -mean D(x_hat)"),
    ])
    ex.gradients_flow(out, {"logits_fake": lf}, what="the generator loss")


@checker
def gan_losses(hinge_d_loss, generator_loss) -> None:
    """Exercise 3.1: hinge_d_loss(logits_real, logits_fake) and generator_loss(logits_fake), scalars."""
    ex = Exercise("3.1", "gan_losses")
    g = torch.Generator().manual_seed(31)
    for shape in [(4, 1, 6, 6), (2, 1, 7, 5), (3, 1, 1, 1)]:
        case = f" (logits of shape {_fmt_shape(shape)})"
        lr, lf = _logits(g, shape), _logits(g, shape)
        _hinge_d(ex, hinge_d_loss, lr, lf, case)
        _gen(ex, generator_loss, _logits(g, shape), case)
    # The saturated case: a perfect discriminator (real >= 1, fake <= -1) has zero loss.
    lr = (torch.rand(4, 1, 3, 3, generator=g) + 1.0).requires_grad_()
    lf = (-torch.rand(4, 1, 3, 3, generator=g) - 1.0).requires_grad_()
    out = ex.call(hinge_d_loss, lr, lf)
    if isinstance(out, torch.Tensor) and abs(float(out.detach())) > 1e-6:
        ex.fail(f"the discriminator loss is {float(out):.4g} for logits real >= 1 and fake <= -1; expected 0 "
                "(the hinge stops pushing once D is confident by the margin)")
    ex.passed("values, scalar shapes, gradients")


# ---------------------------------------------------------------------------- 3.2
class _Tiny(nn.Module):
    """conv -> tanh -> conv (the "last layer") -> image; a fixed random conv plays D."""

    def __init__(self, g, c_in=4, hidden=6, c_out=3):
        super().__init__()
        self.first = nn.Parameter(torch.randn(hidden, c_in, 3, 3, generator=g) * 0.3)
        self.last = nn.Parameter(torch.randn(c_out, hidden, 3, 3, generator=g) * 0.3)
        self.d = torch.randn(1, c_out, 3, 3, generator=g)

    def losses(self, x, target, rec_scale, g_scale):
        h = torch.tanh(F.conv2d(x, self.first, padding=1))
        y = F.conv2d(h, self.last, padding=1)
        rec = rec_scale * (y - target).abs().mean()
        g_loss = -g_scale * F.conv2d(y, self.d).mean()
        return rec, g_loss


def _adaptive_case(ex, fn, g, rec_scale, g_scale, disc_weight, case):
    model = _Tiny(g)
    x = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randn(2, 3, 6, 6, generator=g)
    rec, g_loss = model.losses(x, target, rec_scale, g_scale)
    # independent reference: the two gradients w.r.t. W, in float64 from a float64 copy
    m64 = _Tiny(torch.Generator())
    with torch.no_grad():
        m64.first = nn.Parameter(model.first.detach().double())
        m64.last = nn.Parameter(model.last.detach().double())
        m64.d = model.d.double()
    r64, g64 = m64.losses(x.double(), target.double(), rec_scale, g_scale)
    gr_w = torch.autograd.grad(r64, m64.last, retain_graph=True)[0]
    gg_w = torch.autograd.grad(g64, m64.last, retain_graph=True)[0]
    gr_first = torch.autograd.grad(r64, m64.first, retain_graph=True)[0]
    gg_first = torch.autograd.grad(g64, m64.first)[0]
    nr, ng = gr_w.norm(), gg_w.norm()

    args = (rec, g_loss, model.last) if disc_weight is None else (rec, g_loss, model.last, disc_weight)
    out = ex.call(fn, *args)
    w = 0.8 if disc_weight is None else disc_weight
    if isinstance(out, (float, int)):
        ex.fail(f"the weight is a Python {type(out).__name__}; return the 0-dim tensor (no .item())")
    if isinstance(out, torch.Tensor) and out.dim() != 0:
        ex.fail(f"the weight has shape {_fmt_shape(out.shape)}; it must be a single number (shape ())",
                mistake="take the norm of the whole gradient tensor: grad.norm(), not a per-channel norm")
    out = ex.tensor(out, shape=(), what="the weight" + case)
    if out.requires_grad:
        ex.fail("the weight still requires grad: detach it. It is a constant that scales the GAN loss; "
                "without detach the optimizer would also backpropagate into the gradient norms "
                "(a second-order term that taming does not use)")
    if model.last.grad is not None or model.first.grad is not None:
        ex.fail("your function wrote into the parameters' .grad: .backward() accumulates into every "
                "parameter's gradient, and the optimizer would then apply it",
                mistake="use torch.autograd.grad(loss, last_layer, retain_graph=True)[0], which returns the "
                        "gradient without touching .grad")
    try:
        (rec + g_loss).backward()
    except RuntimeError as e:
        if "second time" in str(e) or "freed" in str(e):
            ex.fail("after your function the training step can no longer backpropagate through the losses: "
                    "the graph was freed",
                    mistake="pass retain_graph=True to both torch.autograd.grad calls: the real backward "
                            "pass still needs that graph")
        raise
    clamp = lambda v: v.clamp(0, 1e4)  # noqa: E731
    ref = clamp(nr / (ng + 1e-4)) * w
    nr1, ng1 = gr_w.abs().sum(), gg_w.abs().sum()
    ex.close(out, ref, atol=1e-6, rtol=2e-4, what="the weight" + case, mistakes=[
        (clamp(ng / (nr + 1e-4)) * w, "the ratio is inverted: lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4)"),
        ((nr / (ng + 1e-4)) * w, "the clamp is missing: clamp the ratio to [0, 1e4] (before multiplying by disc_weight), "
                                 "so a vanishing GAN gradient cannot blow the weight up"),
        (clamp(nr / ng) * w, "the 1e-4 is missing: ||grad L_rec|| / (||grad L_G|| + 1e-4) keeps lambda finite when "
                             "the GAN gradient is tiny"),
        (clamp(nr / (ng + 1e-4) * w), "multiply by disc_weight *after* clamping the ratio to [0, 1e4]"),
        (clamp(nr / (ng + 1e-4)), f"disc_weight is missing: multiply the clamped ratio by disc_weight ({w})"),
        (clamp(nr ** 2 / (ng ** 2 + 1e-4)) * w, "use the norms ||g|| = sqrt(sum g^2), not squared norms"),
        (clamp(nr1 / (ng1 + 1e-4)) * w, "that is the L1 norm (sum of |g|); use the L2 norm, grad.norm()"),
        (clamp(gr_first.norm() / (gg_first.norm() + 1e-4)) * w,
         "the gradients are taken with respect to the wrong parameter: use last_layer, the decoder's last weight"),
        (clamp(nr / (ng + 1e-4)) * 0.8 if disc_weight is not None and disc_weight != 0.8 else torch.tensor(float("nan")),
         "use the disc_weight argument instead of a fixed 0.8"),
    ])


@checker
def adaptive_weight(fn) -> None:
    """Exercise 3.2: lambda = clamp(||grad_W rec|| / (||grad_W g|| + 1e-4), 0, 1e4).detach() * disc_weight."""
    ex = Exercise("3.2", "adaptive_weight")
    g = torch.Generator().manual_seed(32)
    cases = [
        (1.0, 1.0, None, " (typical losses, default disc_weight)"),
        (3.0, 0.2, 0.5, " (disc_weight=0.5)"),
        (0.01, 3e-4, 1.0, " (a tiny GAN gradient, where the 1e-4 matters)"),
        (50.0, 1e-7, 0.8, " (a vanishing GAN gradient: the ratio must be clamped to 1e4)"),
    ]
    for rec_scale, g_scale, disc_weight, case in cases:
        _adaptive_case(ex, fn, g, rec_scale, g_scale, disc_weight, case)
    ex.passed("values, clamp, epsilon, detached, graph kept")


# ---------------------------------------------------------------------------- 3.3
_SPEC = [(4, 2, 1), (4, 2, 1), (4, 1, 1)]  # (kernel, stride, padding) of the three convolutions


def _out_side(s, spec):
    for k, st, p in spec:
        s = (s + 2 * p - k) // st + 1
    return s


def _receptive_field(spec):
    rf, jump = 1, 1
    for k, st, _ in spec:
        rf += (k - 1) * jump
        jump *= st
    return rf


def _grid_mistake(got_h, size):
    """Name the conv-arithmetic slip that would give a `got_h` x ... grid for a `size` px image."""
    variants = {
        "the last conv has stride 2; it should have stride 1 (kernel 4, padding 1)": [(4, 2, 1)] * 3,
        "the first conv has stride 1; it should have stride 2 (kernel 4, padding 1)": [(4, 1, 1), (4, 2, 1), (4, 1, 1)],
        "the second conv has stride 1; it should have stride 2 (kernel 4, padding 1)": [(4, 2, 1), (4, 1, 1), (4, 1, 1)],
        "the convolutions have no padding; use padding=1 on all three": [(4, 2, 0), (4, 2, 0), (4, 1, 0)],
        "the last conv has padding 0; use padding=1": [(4, 2, 1), (4, 2, 1), (4, 1, 0)],
        "kernel 3 instead of 4: use kernel_size=4, padding=1": [(3, 2, 1), (3, 2, 1), (3, 1, 1)],
    }
    for msg, spec in variants.items():
        if _out_side(size, spec) == got_h and got_h != _out_side(size, _SPEC):
            return msg
    return None


def _layout(ex, sd, in_channels, ndf):
    """Find the three convolutions and the BatchNorm in a state_dict by their parameter shapes.

    The parameter shapes are the contract, not the module types or names: a network written
    with nn.Sequential, named attributes or functional activations all pass. Returns
    {"conv1": prefix, "conv2": prefix, "conv3": prefix, "bn": prefix} and the groups.
    """
    groups: dict[str, dict] = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    want = {"conv1": (ndf, in_channels, 4, 4), "conv2": (2 * ndf, ndf, 4, 4), "conv3": (1, 2 * ndf, 4, 4)}
    found, convs, bns = {}, [], []
    for prefix, params in groups.items():
        w = params.get("weight")
        if "running_mean" in params or "running_var" in params:
            bns.append(prefix)
        elif isinstance(w, torch.Tensor) and w.dim() == 4:
            convs.append(prefix)
        elif isinstance(w, torch.Tensor) and w.dim() == 2:
            ex.fail(f"`{prefix}` has a 2-D weight {_fmt_shape(w.shape)}, a Linear layer: a PatchGAN is fully "
                    "convolutional, it outputs a grid of logits (one per patch) and works on any image size")
        elif isinstance(w, torch.Tensor) and w.dim() == 1:
            ex.fail(f"`{prefix}` has a 1-D weight but no running statistics",
                    mistake="the normalisation after the second conv is nn.BatchNorm2d (InstanceNorm, "
                            "GroupNorm and LayerNorm normalise differently)")
    shapes = {p: tuple(groups[p]["weight"].shape) for p in convs}
    if len(convs) != 3:
        ex.fail(f"found {len(convs)} convolution weight(s) {list(shapes.values())}, expected 3 for "
                f"in_channels={in_channels}, ndf={ndf}: {list(want.values())} (two stride-2 convs, then "
                "one stride-1 conv to 1 channel)")
    for name, shape in want.items():
        match = [p for p in convs if shapes[p] == shape]
        if len(match) != 1:
            got = [shapes[p] for p in convs]
            mistake = None
            if any(s[2:] == (3, 3) for s in got):
                mistake = "kernel 3 instead of 4: use kernel_size=4, padding=1"
            elif name == "conv3" and not any(s[0] == 1 for s in got):
                mistake = "the last conv must output 1 channel: one logit per patch"
            ex.fail(f"the convolution weights have shapes {got}; expected {list(want.values())} for "
                    f"in_channels={in_channels}, ndf={ndf} (out, in, kernel, kernel)", mistake=mistake)
        found[name] = match[0]
    first_norm = [p for p in bns if tuple(groups[p]["running_mean"].shape) == (ndf,)]
    if first_norm:
        ex.fail("there is a normalisation layer with ndf features, after the first conv",
                mistake="no norm on the first layer (pix2pix/taming): normalising the raw image features "
                        "throws away their scale, e.g. the overall colour and contrast D should judge")
    bn = [p for p in bns if tuple(groups[p]["running_mean"].shape) == (2 * ndf,)]
    if len(bn) != 1 or len(bns) != 1:
        ex.fail(f"expected one nn.BatchNorm2d({2 * ndf}) after the second conv; found "
                f"{len(bns)} layer(s) with running statistics")
    found["bn"] = bn[0]
    return found, groups


def _known_weights(groups, layout, g):
    """Seeded weights for every entry, scaled so activations stay O(1) and both slopes matter."""
    sd = {}
    for prefix, params in groups.items():
        for leaf, value in params.items():
            key = f"{prefix}.{leaf}" if prefix else leaf
            if not value.is_floating_point():
                sd[key] = value.clone()
                continue
            shape = value.shape
            if prefix == layout["bn"]:
                new = {"weight": 1 + 0.3 * torch.randn(shape, generator=g),
                       "bias": 0.2 * torch.randn(shape, generator=g),
                       "running_mean": 0.3 * torch.randn(shape, generator=g),
                       "running_var": 0.5 + torch.rand(shape, generator=g)}.get(leaf)
            elif leaf == "weight":
                new = torch.randn(shape, generator=g) * 1.5 / (shape[1] * 16) ** 0.5
            else:
                new = 0.2 * torch.randn(shape, generator=g)
            sd[key] = value.clone() if new is None else new.to(value.dtype)
    return sd


def _patch_reference(x, sd, layout, *, train, slope=0.2, last_act=None, final=None, act1=True):
    """float64 PatchGAN forward with the loaded weights; keywords give the known wrong variants."""
    def p(name, leaf):
        key = f"{layout[name]}.{leaf}" if layout[name] else leaf
        v = sd.get(key)
        return None if v is None else v.double()

    h = x.double()
    h = F.conv2d(h, p("conv1", "weight"), p("conv1", "bias"), stride=2, padding=1)
    if act1:
        h = F.leaky_relu(h, slope)
    h = F.conv2d(h, p("conv2", "weight"), p("conv2", "bias"), stride=2, padding=1)
    if train:
        mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = p("bn", "running_mean").view(1, -1, 1, 1), p("bn", "running_var").view(1, -1, 1, 1)
    h = (h - mean) / (var + 1e-5).sqrt()
    weight, bias = p("bn", "weight"), p("bn", "bias")
    if weight is not None:
        h = h * weight.view(1, -1, 1, 1)
    if bias is not None:
        h = h + bias.view(1, -1, 1, 1)
    h = F.leaky_relu(h, slope)
    h = F.conv2d(h, p("conv3", "weight"), p("conv3", "bias"), stride=1, padding=1)
    if last_act == "leaky":
        h = F.leaky_relu(h, slope)
    if final == "sigmoid":
        h = torch.sigmoid(h)
    elif final == "tanh":
        h = torch.tanh(h)
    return h


def _patch_mistakes(x, sd, layout, train):
    def ref(**kw):
        return _patch_reference(x, sd, layout, train=train, **kw)
    return [
        (ref(final="sigmoid"), "a sigmoid at the end: output raw logits; the hinge loss compares D's output "
                               "with the margins +1 and -1, which a sigmoid (0..1) can never reach in the right way"),
        (ref(final="tanh"), "a tanh at the end: output raw logits, the conv's output as it is"),
        (ref(slope=0.01), "the LeakyReLU slope is 0.01, nn.LeakyReLU()'s default; write nn.LeakyReLU(0.2) "
                          "(or F.leaky_relu(x, 0.2))"),
        (ref(slope=0.0), "a ReLU instead of LeakyReLU(0.2): a ReLU zeroes the gradient of every negative "
                         "activation, and the generator learns only through D's gradients"),
        (ref(last_act="leaky"), "an activation after the last conv: the logits must be the conv's raw output"),
        (ref(act1=False), "no activation after the first conv: LeakyReLU(0.2) follows the first and the second conv"),
    ]


@checker
def patch_discriminator(cls) -> None:
    """Exercise 3.3: PatchDiscriminator(in_channels, ndf): conv k4 s2 -> LReLU(0.2) -> conv k4 s2, BN -> LReLU(0.2)
    -> conv k4 s1 to 1 channel; raw logits, fully convolutional.

    Black box: the check reads only the parameter shapes (state_dict), loads known weights
    into them, and compares the outputs with a float64 reference in eval and train mode.
    """
    ex = Exercise("3.3", "patch_discriminator")
    ex.callable(cls)
    for in_channels, ndf in [(3, 8), (1, 12)]:
        try:
            net = ex.call(cls, in_channels=in_channels, ndf=ndf)
        except CheckFailed as e:
            if "forward()" in str(e):
                ex.fail("calling what you passed ran a forward pass: pass PatchDiscriminator itself "
                        "(the class), not an instance")
            raise
        g = torch.Generator().manual_seed(33 + in_channels)
        sd_learner = ex.call(net.state_dict)
        if not isinstance(sd_learner, dict) or not sd_learner:
            ex.fail("PatchDiscriminator(...) has no parameters: build its layers in __init__ as nn modules "
                    "(e.g. an nn.Sequential), so they are registered")
        layout, groups = _layout(ex, sd_learner, in_channels, ndf)
        sd = _known_weights(groups, layout, g)
        ex.call(net.load_state_dict, sd)
        case = f" (in_channels={in_channels}, ndf={ndf})"

        # eval mode: BatchNorm uses the loaded running statistics; the output must be local
        ex.call(net.eval)
        for n, h, w in [(2, 32, 32), (1, 64, 48), (3, 20, 36)]:
            x = torch.randn(n, in_channels, h, w, generator=g)
            with torch.no_grad():
                out = ex.call(net, x)
            want_shape = (n, 1, _out_side(h, _SPEC), _out_side(w, _SPEC))
            if isinstance(out, torch.Tensor) and tuple(out.shape) != want_shape:
                mistake = _grid_mistake(out.shape[-2], h) if out.dim() == 4 else None
                ex.fail(f"for {n} images of {h}x{w} the output has shape {_fmt_shape(out.shape)}, expected "
                        f"{_fmt_shape(want_shape)}: one logit per patch{case}", mistake=mistake)
            out = ex.tensor(out, shape=want_shape, dtype=torch.float32, what=f"the output for {h}x{w} images")
            mistakes = _patch_mistakes(x, sd, layout, False) + [
                (_patch_reference(x, sd, layout, train=True),
                 "in eval mode the normalisation still uses the batch's statistics: use nn.BatchNorm2d, "
                 "which switches to its running statistics after .eval()")]
            try:
                ex.close(out, _patch_reference(x, sd, layout, train=False), atol=1e-4, rtol=1e-4,
                         what=f"the logits in eval mode for {h}x{w} images{case}", mistakes=mistakes)
            except CheckFailed as e:
                if "Likely mistake" in str(e):
                    raise
                # no known mistake: is it at least local (each logit sees only its patch)?
                x2 = x.clone()
                x2[..., h - 4:, w - 4:] += 3.0  # change only the bottom-right 4x4 corner
                with torch.no_grad():
                    out2 = ex.tensor(ex.call(net, x2), shape=want_shape)
                if bool((out2 - out).abs()[0, 0, 0, 0] > 1e-5):
                    ex.fail("changing the bottom-right corner of the image changed the top-left logit: each "
                            f"logit must depend only on its {_receptive_field(_SPEC)}x{_receptive_field(_SPEC)} "
                            "patch (convolutions only, no global pooling or attention)")
                raise

        # train mode: BatchNorm normalises with the batch's statistics; gradients reach the input
        ex.call(net.train, True)
        x = torch.randn(4, in_channels, 32, 40, generator=g).requires_grad_()
        out = ex.tensor(ex.call(net, x), shape=(4, 1, 7, 9), dtype=torch.float32,
                        what="the output in train mode")
        ex.close(out, _patch_reference(x.detach(), sd, layout, train=True), atol=1e-4, rtol=1e-4,
                 what=f"the logits in train mode{case}", mistakes=_patch_mistakes(x.detach(), sd, layout, True))
        ex.gradients_flow(out, {"x": x}, what="the output in train mode")
    ex.passed(f"parameter shapes, outputs with known weights (eval and train mode), output grid 7x7 at 32 px, "
              f"receptive field {_receptive_field(_SPEC)} px, gradients")


# ---------------------------------------------------------------------------- hidden tests
@checker
def gan_losses_hidden(hinge_d_loss, generator_loss) -> None:
    """Hidden test of 3.1: the exact gradients of both losses (one logit per patch, many patches)."""
    ex = Exercise("3.1", "gan_losses", hidden=True)
    g = torch.Generator().manual_seed(310)
    lr = (torch.randn(3, 1, 5, 5, generator=g) * 2).requires_grad_()
    lf = (torch.randn(3, 1, 5, 5, generator=g) * 2).requires_grad_()
    d = ex.tensor(ex.call(hinge_d_loss, lr, lf), shape=(), what="the discriminator loss")
    gr, gf = torch.autograd.grad(d, [lr, lf])
    n = lr.numel()
    ex.close(gr, -0.5 * (lr.detach() < 1).double() / n, atol=1e-7, what="d loss / d logits_real")
    ex.close(gf, 0.5 * (lf.detach() > -1).double() / n, atol=1e-7, what="d loss / d logits_fake")
    lf2 = torch.randn(2, 1, 3, 4, generator=g).requires_grad_()
    gl = ex.tensor(ex.call(generator_loss, lf2), shape=(), what="the generator loss")
    (gg,) = torch.autograd.grad(gl, [lf2])
    ex.close(gg, torch.full(lf2.shape, -1.0 / lf2.numel(), dtype=torch.float64), atol=1e-7,
             what="d generator loss / d logits_fake")


# ---------------------------------------------------------------------------- hints
# Progressive hints, printed by check.hint("N.M") (the idea) and check.hint("N.M", 2) (the
# recipe in words). No hint is runnable code: the learner writes the code.
HINTS = {
    '3.1': (
        'The hinge loss asks the discriminator for logits above +1 on real patches and below -1 '
        'on fake ones, and ignores patches already beyond the margin. The generator just wants '
        'its fakes to score high.',
        'Discriminator: the mean of the positive part of (1 - real logits), plus the mean of the '
        'positive part of (1 + fake logits), all halved. Generator: minus the mean of the fake '
        'logits.',
    ),
    '3.2': (
        "Balance the two losses by how hard each pulls on the decoder's last layer: the ratio of "
        "their gradient norms with respect to that layer's weight.",
        'Take the gradient of each loss with respect to last_layer (keep the graph for the second'
        ' one), and their norms. Divide the reconstruction norm by the GAN norm plus 1e-4, clamp '
        'to [0, 1e4], detach it so no gradient flows through the weight, multiply by disc_weight.',
    ),
    '3.3': (
        'A small fully convolutional network that outputs one logit per overlapping patch: two '
        'downsampling convolutions and a final convolution to one channel, with LeakyReLU(0.2) '
        'after the first two and batch normalisation after the second.',
        'Conv 4x4 stride 2 padding 1 (in_channels to ndf), LeakyReLU with slope 0.2; conv 4x4 '
        'stride 2 padding 1 (ndf to 2 ndf) without bias, BatchNorm over 2 ndf channels, LeakyReLU'
        ' 0.2; conv 4x4 stride 1 padding 1 (2 ndf to 1). No activation at the end: raw logits. '
        'Register the layers in that order; the check loads its own weights into them.',
    ),
}


def hint(number: str, level: int = 1) -> None:
    """Print a hint for an exercise of this lesson: level 1 the idea, level 2 the recipe in words."""
    show_hint(HINTS, number, level)
