"""minigen.course.lesson_tools: the instrumentation lesson 07 calls (step cost, hooks, plots)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minigen.course.lesson_tools import plot_sweep, plot_word_maps, record_inputs, training_step_cost  # noqa: E402


def _linear_loss(n, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(n, d_in, generator=g)  # no grad: the backward computes only dL/dW
    return layer, x, (lambda: layer(x).square().mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_flops_of_a_linear_layer_follow_the_formula(seed):
    g = torch.Generator().manual_seed(seed)
    n, d_in, d_out = (int(v) for v in torch.randint(2, 40, (3,), generator=g))
    _, _, loss_fn = _linear_loss(n, d_in, d_out, seed)
    cost = training_step_cost(loss_fn, repeats=1)
    # forward x @ W^T: 2 n d_in d_out; backward dL/dW = grad^T @ x: 2 n d_in d_out (x needs no grad)
    assert cost["gflops"] * 1e9 == pytest.approx(4 * n * d_in * d_out, rel=1e-9)
    assert cost["ms"] > 0 and math.isnan(cost["peak_mib"])


def test_saved_memory_counts_distinct_storages_and_scales_with_the_batch():
    d_in, d_out = 24, 16
    costs = []
    for n in (8, 16):
        layer, x, _ = _linear_loss(n, d_in, d_out, 0)
        # y = x W^T saves x (for dL/dW); square saves y; a view of x saved again must not count twice
        costs.append(training_step_cost(lambda: layer(x).square().mean() + (layer.weight.sum() * x[:1]).sum(),
                                        repeats=2))
        expected = n * d_in * 4 + n * d_out * 4
        assert costs[-1]["saved_mib"] * 2**20 == expected
    assert costs[1]["saved_mib"] == pytest.approx(2 * costs[0]["saved_mib"])


def test_the_step_really_runs_backward_each_time():
    layer, x, loss_fn = _linear_loss(4, 3, 2, 0)
    training_step_cost(loss_fn, repeats=3)
    # one FLOP-counted step, one memory step, three timed steps: gradients accumulated five times
    single = torch.autograd.grad(loss_fn(), layer.weight)[0]
    torch.testing.assert_close(layer.weight.grad, 5 * single)


def test_step_cost_refuses_bad_input():
    _, _, loss_fn = _linear_loss(4, 3, 2, 0)
    with pytest.raises(ValueError, match="repeats"):
        training_step_cost(loss_fn, repeats=0)
    layer, x, _ = _linear_loss(4, 3, 2, 0)
    with pytest.raises(ValueError, match="scalar"):
        training_step_cost(lambda: layer(x).square(), repeats=1)


def test_record_inputs_gets_the_last_call_and_removes_its_hook():
    inner = torch.nn.Linear(5, 3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), inner)
    a, b = torch.randn(2, 4), torch.randn(7, 4)
    with record_inputs(inner) as rec:
        net(a)
        out = net(b)
    torch.testing.assert_close(rec["inputs"][0], net[0](b))  # the last call's input
    assert not rec["inputs"][0].requires_grad  # detached
    torch.testing.assert_close(out, inner(net[0](b)))  # the output was left unchanged
    assert not inner._forward_hooks  # removed on exit
    with pytest.raises(RuntimeError, match="not called"):
        with record_inputs(inner):
            pass
    assert not inner._forward_hooks


def test_plot_word_maps_draws_one_panel_per_word():
    words = ["a", "red", "circle"]
    maps = torch.rand(16, 5)
    fig = plot_word_maps(torch.rand(3, 8, 8) * 2 - 1, maps, words, title="t")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["sample", *words]
    for k, ax in enumerate(axes[1:]):
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), maps[:, k].reshape(4, 4))
    plt.close(fig)
    with pytest.raises(ValueError, match="square"):
        plot_word_maps(torch.rand(3, 8, 8), torch.rand(15, 5), words)
    with pytest.raises(ValueError, match="token columns"):
        plot_word_maps(torch.rand(3, 8, 8), torch.rand(16, 2), words)


def test_plot_sweep_panels_and_reference_line():
    x = [0.0, 1.0, 3.0]
    fig = plot_sweep(x, {"acc": [0.1, 0.9, 0.95], "fd": [9.0, 3.0, 2.0]}, "w", hlines={"fd": (2.4, "real")})
    acc_ax, fd_ax = fig.axes
    assert acc_ax.get_title() == "acc" and fd_ax.get_xlabel() == "w"
    assert list(fd_ax.lines[0].get_ydata()) == [9.0, 3.0, 2.0]
    assert fd_ax.lines[1].get_ydata()[0] == 2.4 and len(acc_ax.lines) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="2 values for 3"):
        plot_sweep(x, {"acc": [0.1, 0.2]}, "w")
    with pytest.raises(ValueError, match="unknown panel"):
        plot_sweep(x, {"acc": [0.1, 0.2, 0.3]}, "w", hlines={"fd": (1.0, "r")})
