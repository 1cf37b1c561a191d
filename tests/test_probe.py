"""The probe layer, item by item of the contract, with the worker played by a thread.

The judge side (trusted=True) and the worker side (trusted=False) are two Peer objects on a
socketpair; the worker serves one check cell in a thread. Every result is compared with
what the same call gives in-process.
"""

import io
import pickle
import socket
import threading
import time

import pytest
import torch
import torch.nn as nn

from minigen.course import probe


class Worker:
    """A worker namespace served in a background thread for the duration of a `with` block."""

    def __init__(self, ns, timeout=10.0):
        a, b = socket.socketpair()
        self.judge = probe.Peer(a, trusted=True, timeout=timeout)
        self.worker = probe.Peer(b, trusted=False)
        self.worker.namespace = ns
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.error = None

    def _serve(self):
        try:
            self.worker.serve()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def get(self, name):
        return self.judge.lookup([name])[name]

    def __exit__(self, *exc):
        self.judge.end()
        self.thread.join(timeout=5)


def test_call_plain_data_both_ways():
    def fn(x, n, scale=1.0, *, opts=None):
        return {"y": x * scale + n, "shape": tuple(x.shape), "opts": opts, "items": [x.sum(), "s", None, True]}

    x = torch.randn(3, 4)
    with Worker({"fn": fn}) as w:
        out = w.get("fn")(x, 2, scale=0.5, opts={"k": [1, 2.5]})
    ref = fn(x, 2, scale=0.5, opts={"k": [1, 2.5]})
    assert type(out["y"]) is torch.Tensor and torch.equal(out["y"], ref["y"])
    assert out["shape"] == (3, 4) and out["opts"] == {"k": [1, 2.5]}
    assert torch.equal(out["items"][0], ref["items"][0]) and out["items"][1:] == ["s", None, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_is_bridged(dtype):
    def fn(a, b):
        return (a.sin() * b).sum(-1), a.detach() * 2  # one differentiable output, one not

    a = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(5, dtype=dtype)
    with Worker({"fn": fn}) as wk:
        out, plain = wk.get("fn")(a, b)
        assert out.requires_grad and not plain.requires_grad
        ga, gb = torch.autograd.grad((out * w).sum(), [a, b])
        ga2, = torch.autograd.grad((out * w).sum(), [a])  # the worker keeps the graph: twice works
    ra, rb = torch.autograd.grad((fn(a, b)[0] * w).sum(), [a, b])
    assert torch.allclose(ga, ra) and torch.allclose(gb, rb) and torch.allclose(ga2, ra)


def test_no_grad_mode_travels():
    def fn(a):
        return a * 2, torch.is_grad_enabled()

    a = torch.randn(3, requires_grad=True)
    with Worker({"fn": fn}) as w:
        with torch.no_grad():
            out, enabled = w.get("fn")(a)
    assert enabled is False and not out.requires_grad


def test_in_place_mutation_written_back():
    def fn(x, y):
        x.add_(1)
        y.data[0] = 7  # even behind .data
        return None

    x, y = torch.zeros(3), torch.zeros(2, dtype=torch.int64)
    untouched = torch.ones(2)
    with Worker({"fn": fn}) as w:
        assert w.get("fn")(x, y) is None
        w.get("fn")(untouched.clone(), torch.zeros(2, dtype=torch.int64))
    assert torch.equal(x, torch.ones(3)) and y.tolist() == [7, 0]


def test_generator_and_global_rng_advance_as_in_process():
    def fn(shape, generator=None):
        return torch.randn(shape, generator=generator), torch.rand(2)

    g_remote, g_local = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with Worker({"fn": fn}) as w:
        torch.manual_seed(11)
        a, a2 = w.get("fn")((4,), generator=g_remote)
        b, b2 = w.get("fn")((3,), generator=g_remote)  # the generator advanced in the judge too
        after_remote = torch.rand(1)
    torch.manual_seed(11)
    ra, ra2 = fn((4,), g_local)
    rb, rb2 = fn((3,), g_local)
    after_local = torch.rand(1)
    assert torch.equal(a, ra) and torch.equal(b, rb) and torch.equal(a2, ra2) and torch.equal(b2, rb2)
    assert torch.equal(g_remote.get_state(), g_local.get_state())
    assert torch.equal(after_remote, after_local)  # the global RNG advanced exactly as in-process


def test_trusted_callbacks_functions_modules_and_objects():
    calls = []

    def model_fn(x, t):
        calls.append((x.clone(), t))
        return x * 0.5 + t

    class Tok:
        max_length = 4

        def encode(self, texts):
            return torch.tensor([[len(t)] * self.max_length for t in texts])

    lin = nn.Linear(3, 2)

    def learner(model_fn, tok, net, x):
        h = model_fn(x, 3)
        ids = tok.encode(["ab", "c"])
        return net(h), ids, tok.max_length

    x = torch.randn(2, 3)
    with Worker({"learner": learner}) as w:
        out, ids, ml = w.get("learner")(model_fn, Tok(), lin, x)
    assert len(calls) == 1 and torch.equal(calls[0][0], x) and calls[0][1] == 3
    assert torch.allclose(out, lin(x * 0.5 + 3)) and ids.tolist() == [[2] * 4, [1] * 4] and ml == 4


def test_autograd_through_a_trusted_callback():
    enc = nn.Conv2d(3, 4, 2, stride=2)

    def encode(E, x, s):
        return E(x) * s

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with Worker({"encode": encode}) as w:
        z = w.get("encode")(lambda v: torch.tanh(enc(v)), x, 0.3)
        g, = torch.autograd.grad(z.sum(), [x])
    r, = torch.autograd.grad((torch.tanh(enc(x)) * 0.3).sum(), [x])
    assert torch.allclose(g, r, atol=1e-6)


def test_learner_class_instance_handle():
    class Net(nn.Module):
        def __init__(self, d, k=2):
            super().__init__()
            self.lin = nn.Linear(d, k)
            self.norm = nn.BatchNorm1d(k)

        def forward(self, x):
            return self.norm(self.lin(x))

        def describe(self, prefix):
            return prefix + str(self.lin.out_features)

    with Worker({"Net": Net}) as w:
        net = w.get("Net")(3, k=4)
        assert type(net).__name__ == "Net" and not isinstance(net, nn.Module)
        names = [n for n, _ in net.named_parameters()]
        assert names == ["lin.weight", "lin.bias", "norm.weight", "norm.bias"]
        local = Net(3, k=4)
        sd = {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v for k, v in local.state_dict().items()}
        local.load_state_dict(sd)
        net.load_state_dict(sd)
        assert net.eval() is net and net.describe("k=") == "k=4"
        local.eval()
        x = torch.randn(5, 3, requires_grad=True)
        out = net(x)
        assert torch.allclose(out, local(x), atol=1e-6)
        out.sum().backward()  # the learner's module gets its grads in the worker ...
        grads = {n: p.grad for n, p in net.named_parameters()}
        local(x).sum().backward()
        for n, p in local.named_parameters():  # ... and named_parameters() brings them back
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
        remote_sd = net.state_dict()
        assert set(remote_sd) == set(local.state_dict())
        net.zero_grad()
        assert all(p.grad is None for p in net.parameters())
        net.train(True)


class OddError(ValueError):
    pass


class Custom(Exception):
    pass


def test_exceptions_keep_builtin_type_message_and_learner_traceback():
    def helper(x):
        raise OddError(f"bad shape {tuple(x.shape)}")

    def fn(x):
        return helper(x)

    def stub(x):
        raise NotImplementedError("Exercise 9.9: not yet")

    def custom(x):
        raise Custom("mine")

    with Worker({"fn": fn, "stub": stub, "custom": custom}) as w:
        with pytest.raises(ValueError, match=r"bad shape \(2,\)") as e:
            w.get("fn")(torch.zeros(2))
        assert type(e.value) is ValueError and "in helper" in e.value.learner_traceback
        assert "minigen/course/probe.py" not in e.value.learner_traceback
        with pytest.raises(NotImplementedError, match="9.9"):
            w.get("stub")(1)
        with pytest.raises(probe.LearnerError, match="Custom: mine"):
            w.get("custom")(1)


def test_check_failure_in_a_callback_comes_back_as_itself():
    class CheckFailed(AssertionError):
        pass

    def model_fn(x):
        raise CheckFailed("model_fn must get the images first")

    def learner(f):
        try:
            return f(torch.zeros(1))
        finally:
            pass

    with Worker({"learner": learner}) as w:
        with pytest.raises(CheckFailed, match="images first"):
            w.get("learner")(model_fn)


def test_not_callable_and_missing_names():
    with Worker({"value": 3, "arr": torch.ones(2), "obj": object()}) as w:
        got = w.judge.lookup(["value", "arr", "obj", "nope"])
    assert got["value"] == 3 and torch.equal(got["arr"], torch.ones(2))
    assert not callable(got["obj"]) and type(got["obj"]).__name__ == "object"
    assert isinstance(got["nope"], probe._Missing)


def test_time_limit():
    def slow(x):
        time.sleep(3)
        return x

    with Worker({"slow": slow}, timeout=0.5) as w:
        t0 = time.monotonic()
        with pytest.raises(probe.ProbeTimeout, match="longer than 0.5 s"):
            w.get("slow")(1)
        assert time.monotonic() - t0 < 2
        time.sleep(3)  # the late reply arrives and is discarded; the channel still works
        w.judge.timeout = 10
        assert w.get("slow")(2) == 2


class Liar(torch.Tensor):
    def __eq__(self, other):
        return True


def test_tensor_subclass_and_pickled_objects_refused():
    a, b = socket.socketpair()
    judge = probe.Peer(a, trusted=True, timeout=5)
    # a lying subclass, pickled by hand as a hostile worker would
    buf = io.BytesIO()
    torch.save({"tree": (probe.MARK, "t", 0), "tensors": [torch.zeros(2).as_subclass(Liar)]}, buf)
    with pytest.raises(probe.ProbeError, match="not plain"):
        judge._decode(buf.getvalue(), [False])
    # an arbitrary object (pickle would run its __reduce__)
    evil = pickle.dumps({"tree": None, "tensors": [], "x": OddError("boom")})
    with pytest.raises(probe.ProbeError):
        judge._decode(evil, [])
    # a marker pointing outside the tensor list
    buf = io.BytesIO()
    torch.save({"tree": (probe.MARK, "t", 5), "tensors": []}, buf)
    tree, tensors = judge._decode(buf.getvalue(), [])
    with pytest.raises(probe.ProbeError, match="malformed"):
        judge._unmark(tree, tensors, [])
    a.close()
    b.close()


def test_worker_subclass_results_arrive_as_plain_tensors():
    def fn(x):
        return x.as_subclass(Liar) * 0  # its __eq__ would say it equals anything

    with Worker({"fn": fn}) as w:
        out = w.get("fn")(torch.ones(3))
    assert type(out) is torch.Tensor and torch.equal(out, torch.zeros(3))


def test_trusted_side_refuses_private_attributes_and_mutators():
    class Fake(nn.Module):
        def forward(self, x):
            return x

    def learner(m):
        out = []
        for attempt in (lambda: m._modules, lambda: m.forward.__globals__, lambda: m.register_forward_hook(print),
                        lambda: m.apply(print), lambda: m.load_state_dict({})):
            try:
                attempt()
                out.append("allowed")
            except (AttributeError, TypeError, probe.ProbeError):
                out.append("refused")
        return out

    with Worker({"learner": learner}) as w:
        got = w.get("learner")(Fake())
    assert got == ["refused"] * 5, got


def test_parse_check_cell():
    calls, skipped = probe.parse_check_cell(
        "# Check 1.2\ncheck.gaussian_kl(gaussian_kl, 3, scale=0.5)\nassert 1\n", {"check": "m.l01"})
    assert calls == [("m.l01", "gaussian_kl", [("name", "gaussian_kl"), ("const", 3)],
                      {"scale": ("const", 0.5)})]
    assert skipped == ["assert 1"]
    with pytest.raises(probe.CheckCellError):
        probe.parse_check_cell("check.f(g(x))", {"check": "m"})


def test_arguments_from_the_checks_own_graph():
    """adaptive_weight(rec_loss, g_loss, last_layer): the learner differentiates the check's losses."""
    def adaptive_weight(rec_loss, g_loss, last_layer):
        gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gg = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (gr.norm() / (gg.norm() + 1e-4)).detach()

    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 3)
    rec, gl = ((x @ w) ** 2).mean(), (x @ w).sin().sum()
    with Worker({"aw": adaptive_weight}) as wk:
        got = wk.get("aw")(rec, gl, w)
    assert torch.allclose(got, adaptive_weight(rec, gl, w)) and w.grad is None


def _training_loss(model, x0):
    return ((model(x0 * 0.5) - x0) ** 2).mean()


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_gradients_of_a_remote_loss_reach_a_trusted_models_parameters(how):
    """training_loss(model, x0) runs in the worker on the check's model; then loss.backward()
    fills the model's grads (ex.check_training_loss), and torch.autograd.grad(loss, params)
    returns them through worker and callback (ex.gradients_flow) without touching .grad."""
    model = nn.Linear(4, 4)
    params = [model.weight, model.bias]
    x0 = torch.randn(6, 4)
    with Worker({"training_loss": _training_loss}) as wk:
        loss = wk.get("training_loss")(model, x0)
        assert loss.requires_grad
        if how == "backward":
            loss.backward()
            remote = [p.grad.clone() for p in params]
            model.zero_grad()
        else:
            remote = torch.autograd.grad(loss, params)
    if how == "autograd.grad":
        assert model.weight.grad is None and model.bias.grad is None
    expected = torch.autograd.grad(_training_loss(model, x0), params)
    for a, b in zip(remote, expected):
        assert torch.allclose(a, b, atol=1e-6)
