"""Every lesson-03 check: a correct answer passes, the stub fails naming the exercise, and
typical wrong answers fail with the helpful "Likely mistake" message."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigen.course.checks import l03 as check

from _check_helpers import fails, stub


# ---------------------------------------------------------------------------- 3.1
def good_d(lr, lf):
    return 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf).mean())


def good_g(lf):
    return -lf.mean()


def test_gan_losses_correct(capsys):
    check.gan_losses(good_d, good_g)
    # a different correct formulation: clamp instead of relu, mean of a concatenation (equal sizes)
    check.gan_losses(lambda r, f: torch.cat([(1 - r).clamp(min=0).flatten(), (1 + f).clamp(min=0).flatten()]).mean(),
                     lambda f: f.mean().neg())
    out = capsys.readouterr().out
    assert out.count("✓ Exercise 3.1 gan_losses: passed") == 2 and out.count("\n") == 2


def test_gan_losses_stub():
    fails(check.gan_losses, stub, good_g, "Exercise 3.1 (gan_losses) is not done yet", n_answers=2)
    fails(check.gan_losses, good_d, stub, "Exercise 3.1 (gan_losses) is not done yet", n_answers=2)


@pytest.mark.parametrize("d, fragment", [
    (lambda r, f: 0.5 * (F.relu(1 - r).mean() + F.relu(1 - f).mean()), "relu(1 - D) on the fakes"),
    (lambda r, f: 0.5 * (F.relu(1 + r).mean() + F.relu(1 - f).mean()), "signs are flipped"),
    (lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(), "factor 1/2 is missing"),
    (lambda r, f: 0.5 * (F.relu(1 - r).sum() + F.relu(1 + f).sum()), "you summed"),
    (lambda r, f: 0.5 * ((1 - r).mean() + (1 + f).mean()), "relu is missing"),
    (lambda r, f: 0.5 * (F.softplus(-r).mean() + F.softplus(f).mean()), "vanilla"),
    (lambda r, f: 0.5 * (F.relu(-r).mean() + F.relu(f).mean()), "margin 1 is missing"),
    (lambda r, f: 0.5 * (F.relu(1 - r).flatten(1).mean(1) + F.relu(1 + f).flatten(1).mean(1)), "single number"),
    (lambda r, f: good_d(r.detach(), f), "no gradient reaches `logits_real`"),
])
def test_d_loss_mistakes(d, fragment):
    fails(check.gan_losses, d, good_g, "Exercise 3.1", fragment, n_answers=2)


def test_d_loss_detached_fake_gets_no_gradient():
    d = lambda r, f: 0.5 * (F.relu(1 - r).mean() + F.relu(1 + f.detach()).mean())  # noqa: E731
    fails(check.gan_losses, d, good_g, "no gradient reaches `logits_fake`", n_answers=2)


@pytest.mark.parametrize("gl, fragment", [
    (lambda f: f.mean(), "sign is flipped"),
    (lambda f: -f.sum(), "you summed"),
    (lambda f: F.relu(1 - f).mean(), "no margin"),
    (lambda f: F.softplus(-f).mean(), "non-saturating"),
])
def test_g_loss_mistakes(gl, fragment):
    fails(check.gan_losses, good_d, gl, "Exercise 3.1", fragment, n_answers=2)


# ---------------------------------------------------------------------------- 3.2
def good_weight(rec_loss, g_loss, last_layer, disc_weight=0.8):
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight


def make_weight(*, detach=True, eps=1e-4, clamp=True, invert=False, retain=True, squared=False, dw_default=0.8,
                fixed_dw=False, dw_inside=False):
    def weight(rec_loss, g_loss, last_layer, disc_weight=dw_default):
        gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, create_graph=not detach)[0]
        gg = torch.autograd.grad(g_loss, last_layer, retain_graph=retain, create_graph=not detach)[0]
        nr, ng = (gr.pow(2).sum(), gg.pow(2).sum()) if squared else (gr.norm(), gg.norm())
        if invert:
            nr, ng = ng, nr
        r = nr / (ng + eps)
        w = 0.8 if fixed_dw else disc_weight
        if dw_inside:
            r = r * w
        if clamp:
            r = r.clamp(0, 1e4)
        if detach:
            r = r.detach()
        return r if dw_inside else r * w
    return weight


def test_adaptive_weight_correct(capsys):
    check.adaptive_weight(good_weight)
    check.adaptive_weight(make_weight())
    assert capsys.readouterr().out.count("✓ Exercise 3.2 adaptive_weight: passed") == 2


def test_adaptive_weight_stub():
    fails(check.adaptive_weight, stub, "Exercise 3.2 (adaptive_weight) is not done yet")


@pytest.mark.parametrize("answer, fragment", [
    (make_weight(detach=False), "detach"),
    (make_weight(eps=0.0), "1e-4 is missing"),
    (make_weight(clamp=False), "clamp is missing"),
    (make_weight(invert=True), "ratio is inverted"),
    (make_weight(retain=False), "retain_graph=True"),
    (make_weight(squared=True), "squared norms"),
    (make_weight(dw_default=1.0), "disc_weight is missing"),
    (make_weight(fixed_dw=True), "use the disc_weight argument"),
    (make_weight(dw_inside=True), "after* clamping"),
])
def test_adaptive_weight_mistakes(answer, fragment):
    fails(check.adaptive_weight, answer, "Exercise 3.2", fragment)


def test_adaptive_weight_backward_and_item():
    def with_backward(rec_loss, g_loss, last_layer, disc_weight=0.8):
        rec_loss.backward(retain_graph=True)
        gr = last_layer.grad.clone()
        last_layer.grad = None
        g_loss.backward(retain_graph=True)
        gg = last_layer.grad.clone()
        return (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * disc_weight
    fails(check.adaptive_weight, with_backward, ".grad", "torch.autograd.grad")
    fails(check.adaptive_weight, lambda *a: good_weight(*a).item(), "no .item()")


# ---------------------------------------------------------------------------- 3.3
class GoodD(nn.Module):
    def __init__(self, in_channels=3, ndf=64, *, act=lambda: nn.LeakyReLU(0.2), strides=(2, 2, 1), pads=(1, 1, 1),
                 first_norm=False, sigmoid=False, out_ch=1, bn=True):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, strides[0], pads[0])]
        if first_norm:
            layers.append(nn.BatchNorm2d(ndf))
        layers += [act(), nn.Conv2d(ndf, 2 * ndf, 4, strides[1], pads[1], bias=False)]
        if bn:
            layers.append(nn.BatchNorm2d(2 * ndf))
        layers += [act(), nn.Conv2d(2 * ndf, out_ch, 4, strides[2], pads[2])]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def variant(**kw):
    class V(GoodD):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__(in_channels, ndf, **kw)
    return V


class Named(nn.Module):
    """A correct answer written with named attributes and functional activations... in modules."""

    def __init__(self, in_channels=3, ndf=64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1)
        self.act1 = nn.LeakyReLU(0.2, inplace=True)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(ndf * 2)
        self.act2 = nn.LeakyReLU(negative_slope=0.2)
        self.conv3 = nn.Conv2d(ndf * 2, 1, kernel_size=4, stride=1, padding=1)

    def forward(self, x):
        return self.conv3(self.act2(self.norm2(self.conv2(self.act1(self.conv1(x))))))


class Functional(nn.Module):
    """A correct answer with functional activations and the layers registered in another order."""

    def __init__(self, in_channels=3, ndf=64):
        super().__init__()
        self.head = nn.Conv2d(ndf * 2, 1, 4, 1, 1, bias=False)
        self.norm = nn.BatchNorm2d(ndf * 2)
        self.down2 = nn.Conv2d(ndf, ndf * 2, 4, 2, 1)  # a bias before BatchNorm is redundant, not wrong
        self.down1 = nn.Conv2d(in_channels, ndf, 4, 2, 1)

    def forward(self, x):
        h = F.leaky_relu(self.down1(x), 0.2)
        h = F.leaky_relu(self.norm(self.down2(h)), negative_slope=0.2)
        return self.head(h)


def test_patch_discriminator_correct(capsys):
    check.patch_discriminator(GoodD)
    check.patch_discriminator(Named)
    check.patch_discriminator(Functional)
    out = capsys.readouterr().out
    assert out.count("✓ Exercise 3.3 patch_discriminator: passed") == 3 and "7x7" in out


class FunctionalWrong(Functional):
    def __init__(self, in_channels=3, ndf=64, slope=0.2, last=False):
        super().__init__(in_channels, ndf)
        self.slope, self.last = slope, last

    def forward(self, x):
        h = F.leaky_relu(self.down1(x), self.slope)
        h = F.leaky_relu(self.norm(self.down2(h)), self.slope)
        h = self.head(h)
        return F.leaky_relu(h, 0.2) if self.last else h


def functional_variant(**kw):
    class V(FunctionalWrong):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__(in_channels, ndf, **kw)
    return V


@pytest.mark.parametrize("answer, fragment", [
    (functional_variant(slope=0.01), "slope is 0.01"),
    (functional_variant(slope=0.0), "ReLU instead of LeakyReLU"),
    (functional_variant(last=True), "activation after the last conv"),
])
def test_patch_discriminator_functional_mistakes(answer, fragment):
    fails(check.patch_discriminator, answer, "Exercise 3.3", fragment)


def test_patch_discriminator_wrong_layers():
    class WithLinear(GoodD):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__(in_channels, ndf)
            self.fc = nn.Linear(4, 1)

    class Instance(GoodD):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__(in_channels, ndf)
            self.main[3] = nn.InstanceNorm2d(2 * ndf, affine=True)

    class NoEvalStats(GoodD):  # BatchNorm always in batch mode: wrong in eval mode
        def forward(self, x):
            h = self.main[:3](x)
            h = F.batch_norm(h, None, None, self.main[3].weight, self.main[3].bias, training=True)
            return self.main[5](self.main[4](h))

    class Kernel3(GoodD):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__(in_channels, ndf)
            self.main[0] = nn.Conv2d(in_channels, ndf, 3, 2, 1)

    fails(check.patch_discriminator, WithLinear, "fully convolutional")
    fails(check.patch_discriminator, Instance, "BatchNorm2d")
    fails(check.patch_discriminator, NoEvalStats, "eval mode")
    fails(check.patch_discriminator, Kernel3, "kernel 3 instead of 4")


def test_patch_discriminator_stub():
    class Stub(nn.Module):
        def __init__(self, in_channels=3, ndf=64):
            super().__init__()
            raise NotImplementedError
    fails(check.patch_discriminator, Stub, "Exercise 3.3 (patch_discriminator) is not done yet")
    fails(check.patch_discriminator, GoodD(), "not an instance")


@pytest.mark.parametrize("answer, fragment", [
    (variant(sigmoid=True), "raw logits"),
    (variant(act=nn.LeakyReLU), "nn.LeakyReLU()'s default"),
    (variant(act=nn.ReLU), "LeakyReLU(0.2)"),
    (variant(first_norm=True), "no norm on the first layer"),
    (variant(strides=(2, 2, 2)), "stride 1"),
    (variant(out_ch=3), "1 channel"),
    (variant(bn=False), "BatchNorm2d"),
])
def test_patch_discriminator_mistakes(answer, fragment):
    fails(check.patch_discriminator, answer, "Exercise 3.3", fragment)


def test_patch_discriminator_wrong_grid_behaviour():
    class Pooled(GoodD):  # right layers, but a global average at the end: not a patch grid
        def forward(self, x):
            return self.main(x).mean((2, 3), keepdim=True)

    class FunctionalSigmoid(GoodD):
        def forward(self, x):
            return torch.sigmoid(self.main(x))

    class Global(GoodD):  # mixes the whole image into every logit
        def forward(self, x):
            y = self.main(x)
            return y + x.mean((1, 2, 3), keepdim=True)

    fails(check.patch_discriminator, Pooled, "one logit per patch")
    fails(check.patch_discriminator, FunctionalSigmoid, "sigmoid")
    fails(check.patch_discriminator, Global, "top-left logit")
