"""Probes: run a check in a trusted process against learner objects that live in another one.

In grading mode the learner's notebook runs in a worker process (minigen.course._runner) and
its check cells do not run there. The trusted judge (minigen.course._judge) runs each check
function with *proxies* in place of the learner's names; every operation on a proxy is a
probe sent to the worker over a private socket, and only plain data comes back. The
contract (what a check may do with a learner object) is in docs/probe-contract.md; briefly:

- call a function or a class with plain data: tensors (any dtype/shape, requires_grad
  kept), numbers, strings, None, lists/tuples/dicts of these, torch.Generator (its state is
  shipped both ways, so it advances exactly as in the worker) and trusted callables (the
  check's own functions and modules, which the worker calls back over the same socket);
- autograd crosses the boundary: an output that depends on an input with requires_grad
  is wired into the caller's graph by `_Bridge`, whose backward asks the other side to run
  its own backward (the callee keeps the graph of that call until the check cell ends);
- tensors the callee changed in place are written back into the caller's tensors; the
  global torch RNG state travels with every call both ways, so `seeded(seed)` around a
  call makes the worker draw what an in-process call would;
- anything that is not plain data (a learner class instance, a numpy array, a closure)
  comes back as a handle: a proxy that can be called, have a method called by name, or
  be passed back; `named_parameters()`/`parameters()` return copies with `.grad`;
- an exception in the learner's code is raised on the trusted side as the same builtin
  type (unknown types: LearnerError) with the learner's message, and the learner-side
  traceback as `learner_traceback`;
- every probe has a time limit (ProbeTimeout, a TimeoutError).

Data crosses as `torch.save` bytes decoded with `torch.load(weights_only=True)` plus a JSON
envelope; every decoded object is checked again (plain tensor on the CPU, strided, known
container types) and anything else is refused with ProbeError. Tensor subclasses cannot
cross: weights_only refuses to rebuild them.

The same Peer class runs on both sides; `trusted=True` (the judge) restricts what the other
side may do with the judge's objects: call the objects the check passed, call their public
methods, read their public plain-data attributes; results must be plain data.

Why this is one module (both ends, proxies, bridge, encoding): docs/architecture.md. Reading a
check cell's calls is `minigen.course.check_cells`; the worker's answer to "is this minigen's
own implementation" is `minigen.course.integrity.reference_report` (both also importable here).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import secrets
import select
import socket
import struct
import sys
import time
import traceback

import torch

from minigen.course.check_cells import CheckCellError, parse_check_cell  # noqa: F401 - also probe.X, as before
from minigen.course.integrity import reference_report

MAX_ENVELOPE = 1 << 20          # JSON part of one message (bytes)
MAX_PAYLOAD = 256 << 20          # torch.save part of one message (bytes)
MAX_DEPTH = 64                  # nesting of lists/tuples/dicts
MARK = "\x00probe"              # first element of a marker tuple inside a payload tree
HEAD, TAIL = 4_000, 16_000      # characters of captured output kept (beginning and end)

# methods a worker may not call on the judge's objects (they would change a trusted object)
_DENY_METHODS = {"apply", "load_state_dict", "add_module", "register_module", "requires_grad_",
                 "share_memory", "to_empty", "half", "double", "float", "bfloat16", "type",
                 "set_extra_state", "zero_grad", "cuda", "ipu", "xpu", "mtia"}


class ProbeError(RuntimeError):
    """The other process broke the protocol, sent data that is not plain, or died."""


class ProbeTimeout(TimeoutError):
    """A probe did not finish within its time limit."""


class LearnerError(RuntimeError):
    """The learner's code raised an exception whose type is not a Python builtin."""


# ---------------------------------------------------------------------------- output capture
class CappedWriter(io.TextIOBase):
    """A text stream that keeps the first HEAD and the last TAIL characters and counts the rest."""

    def __init__(self):
        self.head, self.tail, self.dropped = [], "", 0
        self.head_len = 0

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            s = str(s)
        n = len(s)
        if self.head_len < HEAD:
            take = s[: HEAD - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            joined = self.tail + s
            if len(joined) > TAIL:
                self.dropped += len(joined) - TAIL
                joined = joined[-TAIL:]
            self.tail = joined
        return n

    def flush(self):
        pass

    def isatty(self):
        return False

    def getvalue(self) -> str:
        mid = f"\n[... {self.dropped} characters of output not kept ...]\n" if self.dropped else ""
        return "".join(self.head) + mid + self.tail


# ---------------------------------------------------------------------------- wire
def _send_msg(sock, env: dict, payload: bytes = b"") -> None:
    head = json.dumps(env).encode()
    sock.sendall(struct.pack("!IQ", len(head), len(payload)) + head + payload)


def _recv_exact(sock, n: int, deadline) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeTimeout("timed out")
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                raise ProbeTimeout("timed out")
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProbeError("the other process closed the channel (it died or was stopped)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_msg(sock, deadline):
    hl, pl = struct.unpack("!IQ", _recv_exact(sock, 12, deadline))
    if hl > MAX_ENVELOPE or pl > MAX_PAYLOAD:
        raise ProbeError(f"a message of {hl} + {pl} bytes is over the limit")
    env = json.loads(_recv_exact(sock, hl, deadline))
    if not isinstance(env, dict):
        raise ProbeError("malformed message")
    payload = _recv_exact(sock, pl, deadline) if pl else b""
    return env, payload


# ---------------------------------------------------------------------------- plain data
_SCALARS = (type(None), bool, int, float, str)


def _plain_tensor(t) -> torch.Tensor:
    """A decoded tensor must be a dense CPU tensor of a plain type; Parameters become tensors."""
    if type(t) is torch.nn.Parameter:
        t = t.detach()
    if type(t) is not torch.Tensor:
        raise ProbeError(f"refused a {type(t).__name__} where a tensor belongs")
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.is_meta:
        raise ProbeError("refused a tensor that is not a dense CPU tensor")
    return t


def _is_marker(x) -> bool:
    return type(x) is tuple and len(x) >= 2 and x[0] == MARK


def _type_info(obj) -> tuple[str, str, str]:
    kind = "class" if isinstance(obj, type) else "callable" if callable(obj) else "object"
    t = obj if isinstance(obj, type) else type(obj)
    return kind, str(getattr(t, "__name__", "object")), str(getattr(t, "__module__", ""))


class _Bridge(torch.autograd.Function):
    """Connects outputs computed by the other process to this process's autograd graph."""

    @staticmethod
    def forward(ctx, link, *inputs):
        ctx.link = link
        outs = tuple(o.clone() for o in link["outs"])
        ctx.mark_non_differentiable(*[o for o in outs if not (o.is_floating_point() or o.is_complex())])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        link = ctx.link
        got = link["peer"]._backward(link["gid"], list(grads))
        if len(got) != link["real"]:
            raise ProbeError("the other process sent back the wrong number of gradients")
        shaped = []
        for g, x in zip(got, link["ins"]):
            if g is not None and (tuple(g.shape) != tuple(x.shape)):
                raise ProbeError("the gradient sent back has the wrong shape")
            shaped.append(None if g is None else g.to(x.dtype))
        # this side's parameters reached through callbacks the other side made during the call
        stash = link["peer"].param_stash
        shaped += [stash.pop(id(p), None) for p in link["params"]]
        shaped += [None] * (len(link["ins"]) - len(shaped))  # the placeholder input, if any
        return (None, *shaped)


def _bridge(peer, gid, values, ins, params=()):
    """Tensors computed by the other side, wired into this side's graph through `ins` and
    `params` (parameters of this side's modules that the other side's computation reached by
    calling back), or a placeholder leaf when there are none."""
    real = len(ins)
    inputs = list(ins) + list(params)
    if not inputs:
        inputs = [torch.zeros((), requires_grad=True)]
    link = {"peer": peer, "gid": gid, "outs": [v.detach() for v in values], "ins": inputs, "real": real,
            "params": list(params)}
    with torch.enable_grad():
        return _Bridge.apply(link, *inputs)


def _leaf_params(outs) -> list:
    """The leaf tensors requiring grad that `outs` were computed from (a module's parameters)."""
    found, seen, stack = [], set(), [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            if all(var is not f for f in found):
                found.append(var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


# ---------------------------------------------------------------------------- proxies
class RemoteObject:
    """An object living in the other process. Calls and method calls are probes."""

    __slots__ = ("_peer", "_h", "_kind")

    def __init__(self, peer, h, kind):
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_kind", kind)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._peer._getattr(self, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot set `{name}` on an object of the other process")

    def __repr__(self):
        return f"<{type(self).__name__} (in the {'notebook' if self._peer.trusted else 'grader'} process)>"


class _RemoteCallable(RemoteObject):
    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return self._peer._call(self._h, None, args, kwargs)


class RemoteMethod:
    """`obj.name` of a remote object: calling it is a probe."""

    __slots__ = ("_peer", "_h", "_name")

    def __init__(self, peer, h, name):
        self._peer, self._h, self._name = peer, h, name

    def __call__(self, *args, **kwargs):
        return self._peer._call(self._h, self._name, args, kwargs)

    def __repr__(self):
        return f"<method {self._name} of an object in the other process>"


_IDENT = re.compile(r"[^0-9A-Za-z_]")


def _proxy_class(kind, name, module, cache={}):  # noqa: B006 - a deliberate per-process cache
    name = _IDENT.sub("_", name)[:40] or "object"
    if name[0].isdigit():
        name = "_" + name
    module = _IDENT.sub("_", module.replace(".", "\x01")).replace("\x01", ".")[:60]
    key = (kind, name, module)
    if key not in cache:
        if len(cache) > 256:
            key = (kind, "object", "")
            name, module = "object", ""
        if key not in cache:
            base = RemoteObject if kind == "object" else _RemoteCallable
            cache[key] = type(name, (base,), {"__slots__": (), "__module__": module or "remote"})
    return cache[key]


# ---------------------------------------------------------------------------- exceptions
_BUILTIN_EXC = {n: c for n, c in vars(builtins).items()
                if isinstance(c, type) and issubclass(c, Exception) and not issubclass(c, BaseExceptionGroup)
                and c.__module__ == "builtins"}


def _learner_frames(tb) -> str:
    """The traceback without the frames of this module and the runner (the learner's frames only)."""
    here = {os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), "_runner.py")}
    frames = [f for f in traceback.extract_tb(tb) if os.path.abspath(f.filename) not in here]
    return "".join(traceback.format_list(frames))


def _error_env(e: BaseException) -> dict:
    token = None
    seen, x = set(), e
    while x is not None and id(x) not in seen and token is None:
        seen.add(id(x))
        token = getattr(x, "_probe_token", None)
        x = x.__cause__ or x.__context__
    text = _learner_frames(e.__traceback__) + "".join(traceback.format_exception_only(type(e), e))
    try:
        message = str(e)
    except Exception:  # noqa: BLE001 - a learner exception whose __str__ raises
        message = "<the exception's message could not be read>"
    return {"type": type(e).__name__[:100], "mro": [c.__name__[:100] for c in type(e).__mro__][:20],
            "message": message[:4000], "traceback": text[-8000:],
            "token": token if isinstance(token, str) else None}


def _raise_remote(err: dict, peer) -> None:
    if not isinstance(err, dict):
        raise ProbeError("malformed error report")
    token = err.get("token")
    if isinstance(token, str) and token in peer._own_errors:
        raise peer._own_errors[token]
    message = str(err.get("message", ""))[:4000]
    name = str(err.get("type", "Exception"))[:100]
    cls = None
    for n in err.get("mro", []) if isinstance(err.get("mro"), list) else []:
        if isinstance(n, str) and n in _BUILTIN_EXC:
            if n != "Exception" or name == "Exception":  # a bare Exception subclass is unknown
                cls = _BUILTIN_EXC[n]
            break
    exc = None
    if cls is not None:
        try:
            exc = cls(message)
        except Exception:  # noqa: BLE001 - builtins whose constructor wants more arguments
            exc = None
    if exc is None:
        exc = LearnerError(f"{name}: {message}")
    exc.learner_type = name
    if isinstance(token, str) and len(token) < 64:
        exc._probe_token = token  # echoed back if it comes out of the learner's code unchanged
    exc.learner_traceback = str(err.get("traceback", ""))[-8000:]
    raise exc


# ---------------------------------------------------------------------------- the peer
class Peer:
    """One end of the probe channel. `trusted=True` is the judge, False the worker."""

    def __init__(self, sock, *, trusted: bool, timeout: float | None = None, guard=None):
        self.sock = sock
        self.trusted = trusted
        self.timeout = timeout          # seconds per probe (judge side)
        self.deadline = None            # absolute limit for the current check cell (judge side)
        self.guard = guard              # context manager around learner code (worker side)
        self.next_id = 1
        self.table: dict[int, object] = {}    # handle -> own object
        self.handle_of: dict[int, int] = {}   # id(own object) -> handle
        self.proxies: dict[int, RemoteObject] = {}  # remote handle -> proxy
        self.graphs: dict[int, tuple] = {}    # own graphs kept for the other side's backward
        self._own_errors: dict[str, BaseException] = {}
        self.param_stash: dict[int, torch.Tensor] = {}  # gradients for parameters, see _Bridge
        self.dead = None

    # ------------------------------------------------------------ encoding
    def _pack(self, obj, *, allow_new: bool):
        tensors, flags, gens, originals = [], [], [], []
        memo: dict[int, int] = {}

        def walk(x, depth):
            if depth > MAX_DEPTH:
                raise ProbeError("data nested too deeply")
            if isinstance(x, RemoteObject):
                if x._peer is not self:
                    raise ProbeError("an object of another channel")
                return (MARK, "yours", x._h)
            if isinstance(x, RemoteMethod):
                raise ProbeError("a method of an object of the other process cannot be passed on")
            if type(x) in _SCALARS:
                return x
            if isinstance(x, torch.Tensor) and type(x) in (torch.Tensor, torch.nn.Parameter):
                if id(x) not in memo:
                    memo[id(x)] = len(tensors)
                    tensors.append(x.detach())
                    originals.append(x)
                    flags.append(bool(x.requires_grad))
                return (MARK, "t", memo[id(x)])
            if isinstance(x, torch.Tensor):  # a subclass: cross as what it holds
                t = torch.Tensor._make_subclass(torch.Tensor, x.detach(), False) if not self.trusted else x
                if type(t) is not torch.Tensor:
                    raise ProbeError(f"a tensor subclass ({type(x).__name__}) cannot cross")
                tensors.append(t)
                originals.append(t)
                flags.append(False)
                return (MARK, "t", len(tensors) - 1)
            if isinstance(x, torch.Generator):
                gens.append(x)
                tensors.append(x.get_state())
                originals.append(None)
                flags.append(False)
                return (MARK, "gen", len(gens) - 1, len(tensors) - 1)
            if isinstance(x, torch.dtype):
                return (MARK, "dtype", str(x).replace("torch.", ""))
            if isinstance(x, torch.device):
                return (MARK, "device", str(x))
            if isinstance(x, torch.Size):
                return (MARK, "size", [int(s) for s in x])
            if isinstance(x, dict):
                return {walk_key(k): walk(v, depth + 1) for k, v in x.items()}
            if isinstance(x, tuple):
                return tuple(walk(v, depth + 1) for v in x)
            if isinstance(x, list):
                return [walk(v, depth + 1) for v in x]
            if isinstance(x, (range, map, filter, zip, type(iter([]))) ) or type(x).__name__ == "generator":
                return walk(list(x), depth)  # an iterator/generator crosses as a list
            # anything else crosses as a handle on this side's object
            if id(x) in self.handle_of:
                h = self.handle_of[id(x)]
            else:
                if not allow_new:
                    raise ProbeError(f"a {type(x).__name__} is not plain data (tensors, numbers, strings, "
                                     "lists, tuples, dicts)")
                h = len(self.table) + 1
                self.table[h] = x
                self.handle_of[id(x)] = h
            kind, name, module = _type_info(x)
            return (MARK, "mine", h, kind, name, module)

        def walk_key(k):
            if type(k) in _SCALARS:
                return k
            raise ProbeError(f"a dict key of type {type(k).__name__} cannot cross")

        tree = walk(obj, 0)
        self._originals = originals
        return tree, tensors, flags, gens

    def _encode(self, tree, tensors) -> bytes:
        buf = io.BytesIO()
        torch.save({"tree": tree, "tensors": tensors}, buf)
        return buf.getvalue()

    def _decode(self, payload: bytes, flags):
        try:
            data = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - anything weights_only refuses
            raise ProbeError(f"refused data that is not plain ({type(e).__name__})") from None
        if type(data) is not dict or set(data) != {"tree", "tensors"} or type(data["tensors"]) is not list:
            raise ProbeError("malformed payload")
        tensors = [_plain_tensor(t) for t in data["tensors"]]
        if not isinstance(flags, list) or len(flags) != len(tensors):
            raise ProbeError("malformed payload flags")
        out = []
        for t, f in zip(tensors, flags):
            if f is True and (t.is_floating_point() or t.is_complex()):
                t = t.detach().requires_grad_(True)
            out.append(t)
        return data["tree"], out

    def _unmark(self, tree, tensors, gens_out: list):
        def walk(x, depth):
            if depth > MAX_DEPTH:
                raise ProbeError("data nested too deeply")
            if type(x) in _SCALARS:
                return x
            if _is_marker(x):
                return marker(x)
            if type(x) is tuple:
                return tuple(walk(v, depth + 1) for v in x)
            if type(x) is list:
                return [walk(v, depth + 1) for v in x]
            if type(x) is dict or type(x).__name__ == "OrderedDict":
                out = {}
                for k, v in x.items():
                    if type(k) not in _SCALARS:
                        raise ProbeError("refused a dict key that is not plain")
                    out[k] = walk(v, depth + 1)
                return out
            raise ProbeError(f"refused a {type(x).__name__}")

        def index(i, n):
            if type(i) is not int or not 0 <= i < n:
                raise ProbeError("malformed marker")
            return i

        def marker(m):
            kind = m[1]
            if kind == "t" and len(m) == 3:
                return tensors[index(m[2], len(tensors))]
            if kind == "gen" and len(m) == 4:
                state = tensors[index(m[3], len(tensors))]
                g = torch.Generator()
                try:
                    g.set_state(state.detach())
                except Exception:  # noqa: BLE001
                    raise ProbeError("malformed generator state") from None
                gens_out.append((m[2], g))
                return g
            if kind == "dtype" and len(m) == 3 and isinstance(m[2], str):
                d = getattr(torch, m[2], None)
                if not isinstance(d, torch.dtype):
                    raise ProbeError("unknown dtype")
                return d
            if kind == "device" and len(m) == 3 and isinstance(m[2], str):
                return torch.device(m[2][:32])
            if kind == "size" and len(m) == 3 and isinstance(m[2], list) and all(type(s) is int for s in m[2]):
                return torch.Size(m[2])
            if kind == "yours" and len(m) == 3:
                if m[2] not in self.table:
                    raise ProbeError("unknown handle")
                return self.table[m[2]]
            if kind == "mine" and len(m) == 6 and type(m[2]) is int and all(isinstance(s, str) for s in m[3:]):
                h = m[2]
                if h not in self.proxies:
                    if m[3] not in ("class", "callable", "object"):
                        raise ProbeError("malformed handle")
                    self.proxies[h] = _proxy_class(m[3], m[4], m[5])(self, h, m[3])
                return self.proxies[h]
            if kind == "missing" and len(m) == 3 and isinstance(m[2], str):
                return _Missing(m[2])
            raise ProbeError("malformed marker")

        return walk(tree, 0)

    # ------------------------------------------------------------ requests (caller side)
    def _request(self, env: dict, payload: bytes = b""):
        if self.dead:
            raise ProbeError(self.dead)
        rid = self.next_id
        self.next_id += 1
        env["id"] = rid
        try:
            _send_msg(self.sock, env, payload)
        except OSError:
            self.dead = "the notebook's process is gone"
            raise ProbeError(self.dead) from None
        deadline = None
        if self.trusted:
            limits = [t for t in (self.timeout and time.monotonic() + self.timeout, self.deadline) if t]
            deadline = min(limits) if limits else None
        while True:
            try:
                renv, rpayload = _recv_msg(self.sock, deadline)
            except ProbeTimeout:
                limit = self.timeout if self.timeout else 0
                e = ProbeTimeout(f"your code took longer than {limit:g} s (the grader's time limit for one "
                                 "call) and was stopped")
                e.limit_s = limit  # the check framework names the limit in its message
                raise e from None
            except (OSError, struct.error, ValueError) as e:
                self.dead = f"the channel to the other process broke ({type(e).__name__})"
                raise ProbeError(self.dead) from None
            except ProbeError as e:
                self.dead = str(e)
                raise
            if "re" in renv:
                if renv["re"] != rid:
                    continue  # a late reply to a probe that timed out
                return renv, rpayload
            self._serve_one(renv, rpayload)

    def _call(self, h, method, args, kwargs):
        tree, tensors, flags, gens = self._pack((list(args), dict(kwargs)), allow_new=self.trusted)
        originals = self._originals
        rng_index = len(tensors)
        tensors.append(torch.get_rng_state())
        flags.append(False)
        env = {"op": "call", "h": h, "method": method, "flags": flags, "rng": rng_index,
               "grad": torch.is_grad_enabled()}
        if self.trusted and torch.is_grad_enabled():
            # arguments that are results of the check's own graph (e.g. a loss of `last_layer`):
            # the worker sees them as functions of the leaves sent with them
            nonleaf = [i for i, f in enumerate(flags[:rng_index]) if f and not originals[i].is_leaf]
            leaves = [i for i, f in enumerate(flags[:rng_index]) if f and originals[i].is_leaf]
            if nonleaf and leaves:
                gid = len(self.graphs) + 1
                self.graphs[gid] = ([originals[i] for i in leaves], [originals[i] for i in nonleaf], True, [])
                env["arg_graph"] = {"gid": gid, "outs": nonleaf, "ins": leaves}
        graphs_before = set(self.graphs)
        renv, rpayload = self._request(env, self._encode(tree, tensors))
        if "error" in renv:
            _raise_remote(renv["error"], self)
        params = []
        for gid in set(self.graphs) - graphs_before:  # callbacks served during the call
            for prm in self.graphs[gid][3]:
                if all(prm is not q for q in params):
                    params.append(prm)
        rtree, rtensors = self._decode(rpayload, renv.get("flags"))
        # the callee's global RNG state, generator states, in-place changes
        info = renv.get("info", {})
        if not isinstance(info, dict):
            raise ProbeError("malformed reply")
        rng = info.get("rng")
        if type(rng) is int and 0 <= rng < len(rtensors):
            try:
                torch.set_rng_state(rtensors[rng].detach())
            except Exception:  # noqa: BLE001
                raise ProbeError("malformed RNG state") from None
        for gi, ti in info.get("gens", []):
            if type(gi) is int and 0 <= gi < len(gens) and type(ti) is int and 0 <= ti < len(rtensors):
                try:
                    gens[gi].set_state(rtensors[ti].detach())
                except Exception:  # noqa: BLE001
                    raise ProbeError("malformed generator state") from None
        for ai, ti in info.get("mutated", []):
            if type(ai) is int and 0 <= ai < len(tensors) - 1 and type(ti) is int and 0 <= ti < len(rtensors):
                orig, new = tensors[ai], rtensors[ti].detach()
                with torch.no_grad():
                    if orig.shape == new.shape and orig.dtype == new.dtype:
                        orig.copy_(new)
                    else:
                        orig.data = new.clone()
        graph = info.get("graph")
        if graph is not None and torch.is_grad_enabled():
            gid, outs = graph.get("gid"), graph.get("outs")
            ins = [t for t, f in zip(originals[:rng_index], flags[:rng_index]) if f]
            if type(gid) is int and isinstance(outs, list) and all(type(i) is int and 0 <= i < len(rtensors)
                                                                  for i in outs):
                outs = sorted(set(outs))
                bridged = _bridge(self, gid, [rtensors[i] for i in outs], ins, params)
                for i, b in zip(outs, bridged):
                    rtensors[i] = b
        result = self._unmark(rtree, rtensors, [])
        if method in ("named_parameters", "parameters") and isinstance(result, list):
            result = _with_grads(result, method)
        return result

    def _backward(self, gid, grads):
        tensors = [g.detach() if g is not None else None for g in grads]
        tree = [(MARK, "t", i) if g is not None else None for i, g in enumerate(tensors)]
        tensors = [g if g is not None else torch.zeros(0) for g in tensors]
        renv, rpayload = self._request({"op": "backward", "gid": gid, "flags": [False] * len(tensors)},
                                       self._encode(tree, tensors))
        if "error" in renv:
            _raise_remote(renv["error"], self)
        rtree, rtensors = self._decode(rpayload, renv.get("flags"))
        out = self._unmark(rtree, rtensors, [])
        if not isinstance(out, list) or not all(g is None or isinstance(g, torch.Tensor) for g in out):
            raise ProbeError("malformed gradients")
        return out

    def _getattr(self, proxy, name):
        if self.trusted:
            # the contract: on learner objects, only method calls by name
            return RemoteMethod(self, proxy._h, name)
        renv, rpayload = self._request({"op": "getattr", "h": proxy._h, "name": name})
        if "error" in renv:
            _raise_remote(renv["error"], self)
        if renv.get("method"):
            return RemoteMethod(self, proxy._h, name)
        rtree, rtensors = self._decode(rpayload, renv.get("flags"))
        return self._unmark(rtree, rtensors, [])

    def lookup(self, names: list[str]) -> dict:
        """The learner's values for `names` (plain data, proxies, or _Missing)."""
        renv, rpayload = self._request({"op": "lookup", "names": list(names)})
        if "error" in renv:
            _raise_remote(renv["error"], self)
        rtree, rtensors = self._decode(rpayload, renv.get("flags"))
        out = self._unmark(rtree, rtensors, [])
        if not isinstance(out, dict):
            raise ProbeError("malformed lookup reply")
        return out

    def report(self, names: list[str]) -> dict:
        """The worker's own account of what the names are (for the integrity column); untrusted."""
        renv, _ = self._request({"op": "report", "names": list(names)})
        info = renv.get("report")
        return info if isinstance(info, dict) else {}

    def end(self) -> None:
        """Tell the worker this check cell is over: it frees kept graphs and handles and runs on."""
        try:
            self._request({"op": "end"})
        except (ProbeError, ProbeTimeout):
            pass
        self.proxies.clear()
        self.table.clear()
        self.handle_of.clear()
        self.graphs.clear()
        self._own_errors.clear()

    # ------------------------------------------------------------ serving (callee side)
    def serve(self) -> None:
        """Worker: answer probes until the judge says the check cell is over."""
        while True:
            env, payload = _recv_msg(self.sock, None)
            if "re" in env:
                continue
            if env.get("op") == "end":
                self.table.clear()
                self.handle_of.clear()
                self.proxies.clear()
                self.graphs.clear()
                _send_msg(self.sock, {"re": env.get("id"), "ok": True})
                return
            self._serve_one(env, payload)

    def _serve_one(self, env, payload) -> None:
        rid = env.get("id")
        try:
            renv, rpayload = self._dispatch(env, payload)
        except BaseException as e:  # noqa: BLE001 - everything the served code raises is reported
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and self.trusted:
                raise
            token = None
            if self.trusted:
                token = secrets.token_hex(8)
                self._own_errors[token] = e
            err = _error_env(e)
            if token:
                err["token"] = token
            renv, rpayload = {"error": err}, b""
        renv["re"] = rid
        try:
            _send_msg(self.sock, renv, rpayload)
        except OSError:
            self.dead = "the channel is closed"

    def _own(self, h):
        if type(h) is not int or h not in self.table:
            raise ProbeError("unknown handle")
        return self.table[h]

    def _dispatch(self, env, payload):
        op = env.get("op")
        if op == "call":
            return self._serve_call(env, payload)
        if op == "backward":
            return self._serve_backward(env, payload)
        if op == "getattr" and self.trusted:
            obj, name = self._own(env.get("h")), env.get("name")
            if not isinstance(name, str) or name.startswith("_"):
                raise AttributeError(f"`{name}` is not available")
            value = getattr(obj, name)
            if callable(value) and getattr(value, "__self__", None) is obj:
                return {"method": True}, b""
            tree, tensors, flags, _ = self._pack(value, allow_new=False)
            return {"flags": flags}, self._encode(tree, tensors)
        if op == "lookup" and not self.trusted:
            ns = self.namespace
            names = env.get("names")
            if not isinstance(names, list):
                raise ProbeError("malformed lookup")
            values = {n: ns[n] if n in ns else (MARK, "missing", n) for n in names if isinstance(n, str)}
            tree, tensors, flags, _ = self._pack(values, allow_new=True)
            return {"flags": flags}, self._encode(tree, tensors)
        if op == "report" and not self.trusted:
            return {"report": {n: reference_report(self.namespace.get(n)) for n in env.get("names", [])
                               if isinstance(n, str)}}, b""
        raise ProbeError(f"unknown probe {op!r}")

    def _serve_call(self, env, payload):
        obj = self._own(env.get("h"))
        method = env.get("method")
        flags = env.get("flags")
        tree, tensors = self._decode(payload, flags)
        rng = env.get("rng")
        if type(rng) is not int or not 0 <= rng < len(tensors):
            raise ProbeError("malformed call")
        arg_graph = env.get("arg_graph")
        via_graph = set()
        if arg_graph is not None and not self.trusted:
            gid, outs, ins = arg_graph.get("gid"), arg_graph.get("outs"), arg_graph.get("ins")
            ok = type(gid) is int and isinstance(outs, list) and isinstance(ins, list) and all(
                type(i) is int and 0 <= i < rng and tensors[i].requires_grad for i in outs + ins)
            if not ok or set(outs) & set(ins):
                raise ProbeError("malformed call")
            bridged = _bridge(self, gid, [tensors[i] for i in outs], [tensors[i] for i in ins])
            for i, b in zip(outs, bridged):
                tensors[i] = b
            via_graph = set(outs)
        gens: list = []
        args, kwargs = self._unmark(tree, tensors, gens)
        if not (isinstance(args, list) and isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise ProbeError("malformed call")
        if method is not None:
            if not isinstance(method, str) or method.startswith("_"):
                raise AttributeError(f"`{method}` is not available")
            if self.trusted and (method in _DENY_METHODS or method.startswith("register")):
                raise AttributeError(f"`{method}` may not be called on the grader's objects")
            if not self.trusted and method in ("named_parameters", "parameters"):
                target = lambda: [(n, p, p.grad) for n, p in obj.named_parameters()]  # noqa: E731
            elif not self.trusted and method == "state_dict":
                target = lambda *a, **k: dict(obj.state_dict(*a, **k))  # noqa: E731
            else:
                target = getattr(obj, method)
                if self.trusted and getattr(target, "__self__", None) is not obj:
                    raise AttributeError(f"`{method}` is not a method")
        else:
            if not callable(obj):
                raise TypeError(f"'{type(obj).__name__}' object is not callable")
            target = obj
        arg_tensors = tensors[:rng]
        before = [(t._version, t.detach().clone()) for t in arg_tensors]
        torch.set_rng_state(tensors[rng].detach())
        grad_mode = bool(env.get("grad", True))
        guard = self.guard if (self.guard is not None and not self.trusted) else _nullguard
        with guard(), torch.set_grad_enabled(grad_mode):
            result = target(*args, **kwargs)
        # what goes back: result, RNG state, generator states, mutated arguments, graph
        rtree, rtensors, rflags, _ = self._pack(result, allow_new=not self.trusted)
        originals = self._originals
        info = {"rng": len(rtensors)}
        rtensors.append(torch.get_rng_state())
        rflags.append(False)
        info["gens"] = []
        for gi, g in gens:
            info["gens"].append([gi, len(rtensors)])
            rtensors.append(g.get_state())
            rflags.append(False)
        info["mutated"] = []
        for i, (t, (version, copy)) in enumerate(zip(arg_tensors, before)):
            if t._version != version or t.shape != copy.shape or not torch.equal(t, copy):
                info["mutated"].append([i, len(rtensors)])
                rtensors.append(t.detach())
                rflags.append(False)
        # the graph of this call, kept for the caller's backward: gradients for the flagged
        # arguments (in order; None for those computed from other arguments, whose share
        # already reaches their leaves), and .grad accumulated in this side's parameters
        ins = [None if i in via_graph else t for i, (t, f) in enumerate(zip(arg_tensors, flags[:rng])) if f is True]
        outs = [i for i, t in enumerate(rtensors[:info["rng"]]) if rflags[i]]
        if outs:
            gid = len(self.graphs) + 1
            out_tensors = [originals[i] for i in outs]
            params = []
            if self.trusted:  # parameters of the check's modules: their gradients go back via _Bridge
                ids = {id(x) for x in ins if x is not None}
                params = [q for q in _leaf_params(out_tensors) if id(q) not in ids]
            self.graphs[gid] = (ins, out_tensors, False, params)
            info["graph"] = {"gid": gid, "outs": outs}
        rflags = [False] * len(rflags)  # outputs arrive as plain tensors; the bridge adds the grad
        return {"flags": rflags, "info": info}, self._encode(rtree, [t.detach() for t in rtensors])

    def _serve_backward(self, env, payload):
        gid = env.get("gid")
        if gid not in self.graphs:
            raise ProbeError("unknown graph (it was freed when the check cell ended)")
        ins, outs, only_inputs, params = self.graphs[gid]
        tree, tensors = self._decode(payload, env.get("flags"))
        grads = self._unmark(tree, tensors, [])
        if not isinstance(grads, list) or len(grads) != len(outs) or not all(
                g is None or (isinstance(g, torch.Tensor) and g.shape == o.shape) for g, o in zip(grads, outs)):
            raise ProbeError("malformed backward")
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        guard = self.guard if (self.guard is not None and not self.trusted) else _nullguard
        live = [x for x in ins if x is not None and x.requires_grad]
        saved = [x.grad for x in live]
        for x in live:
            if not x.is_leaf:
                x.retain_grad()
            x.grad = None
        try:
            if self.trusted and params and pairs:
                # the check's parameters: gradients kept for the _Bridge that owns them, not
                # accumulated, so torch.autograd.grad on the trusted side sees them as results
                with torch.enable_grad():
                    got_all = torch.autograd.grad([o for o, _ in pairs], live + params,
                                                  [g.to(o.dtype) for o, g in pairs], retain_graph=True,
                                                  allow_unused=True)
                by_id = {id(x): g for x, g in zip(live, got_all[:len(live)])}
                for prm, g in zip(params, got_all[len(live):]):
                    if g is not None:
                        old = self.param_stash.get(id(prm))
                        self.param_stash[id(prm)] = g if old is None else old + g
                got = [None if x is None else by_id.get(id(x)) for x in ins]
                return self._grads_reply(got)
            with guard(), torch.enable_grad():
                if pairs:
                    # backward() as in-process: this side's parameters accumulate .grad too
                    # (for the check's own argument graphs, only the inputs asked for)
                    torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs],
                                            retain_graph=True, inputs=live if only_inputs else None)
            got = [None if x is None or not x.requires_grad else x.grad for x in ins]
        finally:
            for x, old in zip(live, saved):
                x.grad = old
        return self._grads_reply(got)

    def _grads_reply(self, got):
        rtree = [(MARK, "t", i) if g is not None else None for i, g in enumerate(got)]
        rtensors = [g.detach() if g is not None else torch.zeros(0) for g in got]
        return {"flags": [False] * len(rtensors)}, self._encode(rtree, rtensors)


class _nullguard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Missing:
    """A name the notebook does not define."""

    def __init__(self, name):
        self.name = name


def _with_grads(items, method):
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise ProbeError("malformed parameter list")
        name, p, g = item
        p = p.detach().clone().requires_grad_(p.is_floating_point())
        if isinstance(g, torch.Tensor) and g.shape == p.shape:
            p.grad = g.to(p.dtype)
        out.append((name, p) if method == "named_parameters" else p)
    return out


# ---------------------------------------------------------------------------- check cells
def run_check_cell(peer: Peer, source: str, aliases: dict[str, str]) -> None:
    """Judge: run the check calls of one cell with proxies for the learner's names."""
    import importlib

    calls, skipped = parse_check_cell(source, aliases)
    for line in skipped:
        print(f"[grader] not a check call, not run: {line.splitlines()[0][:100]}", file=sys.stderr)
    for modname, fname, args, kwargs in calls:
        module = importlib.import_module(modname)
        fn = getattr(module, fname)
        names = [v for k, v in args + list(kwargs.values()) if k == "name"]
        values = peer.lookup(names) if names else {}

        def value(a):
            kind, v = a
            if kind == "const":
                return v
            got = values.get(v)
            if isinstance(got, _Missing) or v not in values:
                raise NameError(f"name '{v}' is not defined: run (and keep) the cell that defines it")
            return got

        fn(*[value(a) for a in args], **{k: value(a) for k, a in kwargs.items()})
