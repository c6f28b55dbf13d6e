"""Stacking K plain models through their torch.fx graph: every op is kept, replaced or rewritten per branch, or the
stacking is refused.

The K models are traced (grouped and torch.nn layers as leaves) and must give one graph. Model 0's graph is run once
on an example input to learn each value's plain shape, then rebuilt for the stacked layout, where a plain
``(N, C, ...)`` value is ``(N, K*C, ...)`` (branch k owns channels ``[k*C, (k+1)*C)``). Each node is

- per channel (activations, pooling, dropout, elementwise arithmetic whose operands line up, ops along dims >= 2):
  kept as it is, since it already acts on every channel, and so every branch, on its own;
- parametric (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm1d/2d``, ``nn.LayerNorm``): replaced by the grouped layer
  built with ``from_modules`` from the K models' modules;
- channel structured (cat/stack/chunk/split/narrow/select/indexing along dim 1, reshapes, permutes, reductions and
  softmax over channels, channel shuffle, size queries, elementwise ops that broadcast across channels): rewritten
  with :mod:`groupnet.model_stacking.branch_ops`, which runs the plain op per branch on the ``(N, K, C, ...)`` view;
- anything else: :class:`StackingError`, naming the node, its op, its source line and why.

The forward is traced in training and in eval mode; flags that differ (``F.dropout(x, p, self.training)``) read the
stacked model's own ``training`` attribute, and a forward whose graph differs between the modes is refused.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from groupnet.model_stacking import branch_ops as ops
from groupnet.modules.registry import grouped_class_for, is_grouped_layer

INFO_KEY = "groupnet_stacking"  # key of StackInfo in the stacked GraphModule's ``meta`` (kept by deepcopy)


class StackingError(TypeError):
    """The K models cannot be stacked into a model that provably computes what they compute."""


@dataclass
class StackInfo:
    """What :func:`groupnet.extract_branch` needs to give back one plain model of a stacked graph."""

    branches: int
    skeleton: nn.Module  # model 0 with its tensors on the meta device
    per_branch: frozenset[str]  # tensors read by the graph and stored as (K, *shape)
    moved: dict[str, str]  # parameters of functional convs/linears -> their name in the grouped layer that holds them
    unread: dict[str, Tensor]  # (K, *shape) copies of the tensors the forward never reads


class _Refuse(Exception):
    pass


@dataclass(frozen=True)
class _T:
    """A plain tensor value seen on the example input."""

    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


B, S, P, BT = "B", "S", "P", "BT"  # branch-stacked tensor, shared value, per-branch (K, ...) tensor, tuple of B

_PER_CHANNEL_MODULES: dict[type, tuple[int, ...] | None] = {
    **{t: None for t in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                         nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
                         nn.Dropout, nn.AlphaDropout)},
    **{t: (3,) for t in (nn.Dropout1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)},
    **{t: (4,) for t in (nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                         nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
                         nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)},
    nn.Upsample: (3, 4, 5),
}
# ops of one tensor that act on each element or each channel's own spatial map (ranks required, None: any)
_UNARY: dict[str, tuple[int, ...] | None] = {
    **{n: None for n in (
        "relu", "relu_", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
        "elu", "selu", "celu", "softplus", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt",
        "abs", "neg", "square", "clamp", "clamp_", "clip", "dropout", "alpha_dropout", "contiguous", "clone",
        "detach", "float", "double", "half", "bfloat16", "to", "erf", "sin", "cos", "reciprocal", "logsigmoid",
        "softsign", "threshold", "sign", "floor", "ceil", "round", "trunc", "nan_to_num", "exp_", "mul_scalar",
        "hardtanh_", "leaky_relu_", "elu_", "silu_", "clamp_min", "clamp_max", "relu6_")},
    **{n: (3,) for n in ("dropout1d", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d")},
    **{n: (4,) for n in ("dropout2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                         "pixel_shuffle", "pixel_unshuffle", "upsample_nearest", "upsample_bilinear")},
    "interpolate": (3, 4, 5), "upsample": (3, 4, 5),
}
_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "floordiv", "iadd", "isub",
                "imul", "itruediv", "pow", "maximum", "minimum", "where", "true_divide", "eq", "ne", "lt", "le", "gt",
                "ge", "masked_fill", "lerp", "addcmul", "rsub", "mod", "fmod", "neg_", "copysign", "hypot"}
# ops with dim arguments: position of the first dim argument and its keyword; a dim may be an int or a tuple
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "argmax", "argmin",
           "softmax", "log_softmax", "cumsum", "cumprod", "all", "any", "unbind", "narrow", "select", "squeeze",
           "unsqueeze", "flip", "unflatten", "nansum", "nanmean", "median"}
_DIM_AT = {"chunk": 2, "split": 2, "tensor_split": 2, "roll": 2}
_NEEDS_DIM = {"max", "min", "softmax", "log_softmax", "cumsum", "cumprod", "unbind", "narrow", "select", "unsqueeze",
              "unflatten", "median", "chunk", "split", "tensor_split"}
_DEFAULT_DIM = {"unbind": 0, "chunk": 0, "split": 0, "tensor_split": 0}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", "transpose_"}
_KNOWN = {*_UNARY, *_ELEMENTWISE, *_REDUCE, *_DIM_AT, *_TRANSPOSE, "cat", "concat", "concatenate", "stack", "size",
          "dim", "ndimension", "numel", "flatten", "view", "reshape", "view_as", "reshape_as", "permute",
          "channel_shuffle", "pad"}
_SHARED_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _function_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for space, mod in (("operator", operator), ("torch", torch), ("F", F)):  # F last: F.relu wins over torch.relu
        for name, v in vars(mod).items():
            if callable(v) and not name.startswith("__"):
                names[id(v)] = f"{space}.{name}"
    return names


_NAMES: dict[int, str] | None = None


def _op_name(n: fx.Node) -> str | None:
    """``"torch.cat"``, ``"F.relu"``, ``"operator.add"``, ``"method.view"``, or None for an unknown function."""
    global _NAMES
    if n.op == "call_method":
        return f"method.{n.target}"
    if _NAMES is None:
        _NAMES = _function_names()
    return _NAMES.get(id(n.target))


# ------------------------------------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """Grouped layers and torch.nn layers are leaves; remembers the innermost module whose forward failed."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_grouped_layer(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def _trace(model: nn.Module) -> fx.Graph:
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as e:
        where = "model" + (f".{tracer.failed_at}" if tracer.failed_at else "")
        raise StackingError(
            f"stack_models: torch.fx cannot trace the forward of {where} ({type(e).__name__}: {e}). Stacking reads the "
            "traced graph to check every op; make that forward traceable (no Python branching on tensor values or "
            "shapes), or stack a model without it") from e


def _trace_both_modes(model: nn.Module) -> fx.Graph:
    modes = {m: m.training for m in model.modules()}
    try:
        g_train = _trace(model.train(True))
        g_eval = _trace(model.train(False))
    finally:
        for m, t in modes.items():
            m.training = t
    return _merge_modes(g_train, g_eval)


def _merge_modes(gt: fx.Graph, ge: fx.Graph) -> fx.Graph:
    """``gt`` with every constant that differs in ``ge`` replaced by a choice on the module's ``training`` flag."""
    nt, ne = list(gt.nodes), list(ge.nodes)
    for a, b in zip(nt, ne):
        if (a.op, a.target, a.name) != (b.op, b.target, b.name):
            raise StackingError(_describe(a, "the forward takes another path in eval mode than in training mode "
                                             f"(eval mode has {b.op} {b.target} here); stacking needs one graph"))
    if len(nt) != len(ne):
        raise StackingError("stack_models: the forward has another number of ops in eval mode than in training mode")
    flag: list[fx.Node] = []

    def mode_node() -> fx.Node:
        if not flag:
            first = next(n for n in gt.nodes if n.op != "placeholder")
            with gt.inserting_before(first):
                flag.append(gt.get_attr("training"))
        return flag[0]

    def merge(x: Any, y: Any) -> Any:
        if isinstance(x, fx.Node) and isinstance(y, fx.Node) and x.name == y.name:
            return x  # the same value of the train-mode graph
        if isinstance(x, slice) and isinstance(y, slice):
            return slice(merge(x.start, y.start), merge(x.stop, y.stop), merge(x.step, y.step))
        if isinstance(x, (tuple, list)) and type(x) is type(y) and len(x) == len(y):
            return type(x)(merge(a, b) for a, b in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            return {k: merge(x[k], y[k]) for k in x}
        if type(x) is type(y) and not isinstance(x, Tensor) and x == y:
            return x
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            raise StackingError(_describe(a_now[0], "an argument is computed in one mode and constant in the other"))
        if (x, y) == (True, False):
            return mode_node()
        return gt.call_function(ops.by_mode, (mode_node(), x, y))

    a_now: list[fx.Node] = []
    for a, b in zip(nt, ne):
        a_now[:] = [a]
        if a.args != b.args or a.kwargs != b.kwargs:
            with gt.inserting_before(a):
                a.args, a.kwargs = merge(a.args, b.args), merge(a.kwargs, b.kwargs)
    return gt


# ------------------------------------------------------------------------------------------------------- shapes
class _Shapes(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["groupnet_plain"] = _summary(out)
        return out


def _summary(v: Any) -> Any:
    if isinstance(v, Tensor):
        return _T(tuple(v.shape))
    if isinstance(v, (tuple, list)):
        return tuple(_summary(a) for a in v)
    return v


def _probe_input(model: nn.Module, graph: fx.Graph) -> Tensor:
    """An input of the right rank and channels, read from the first layer the graph calls."""
    ref = next(chain(model.parameters(), model.buffers()), None)
    factory = {"dtype": ref.dtype if ref is not None and ref.is_floating_point() else None,
               "device": ref.device if ref is not None else None}
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = model.get_submodule(n.target)
        if isinstance(m, nn.Conv2d):
            return torch.randn(2, m.in_channels, 32, 32, **factory)
        if isinstance(m, nn.BatchNorm2d):
            return torch.randn(2, m.num_features, 32, 32, **factory)
        if isinstance(m, nn.Linear):
            return torch.randn(2, m.in_features, **factory)
        if isinstance(m, nn.BatchNorm1d):
            return torch.randn(2, m.num_features, **factory)
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return torch.randn(2, m.normalized_shape[0], **factory)
        if any(True for _ in chain(m.parameters(), m.buffers())):
            break
    raise StackingError("stack_models: cannot tell the input shape from the model's first layer; pass example_input "
                        "(one input of one model, e.g. torch.randn(2, 3, 32, 32))")


def _record_shapes(model: nn.Module, graph: fx.Graph, example: Tensor | None) -> None:
    probe = example is None
    x = _probe_input(model, graph) if probe else example
    plain = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        plain.eval()
        with torch.no_grad():
            _Shapes(plain).run(x)
    except Exception as e:
        hint = (f"the probe input of shape {tuple(x.shape)} (read from the first layer) does not fit; pass "
                "example_input" if probe else f"example_input of shape {tuple(x.shape)} fails")
        raise StackingError(f"stack_models: running model 0's traced graph failed: {hint} ({type(e).__name__}: {e})") \
            from e
    finally:
        for m, t in modes.items():
            m.training = t


# ------------------------------------------------------------------------------------------------------- messages
def _source_line(n: fx.Node) -> str:
    trace = n.stack_trace or ""
    lines = trace.strip().splitlines()
    best = ""
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("File ") and "/torch/" not in s and "/groupnet/model_stacking/" not in s:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            path, _, rest = s[len("File "):].partition(", line ")
            best = f"{path.strip(chr(34)).rsplit('/', 1)[-1]}:{rest.split(',')[0]} `{code}`"
    return best or "unknown source line"


def _target_name(n: fx.Node) -> str:
    if n.op in ("call_module", "get_attr", "call_method", "placeholder", "output"):
        return str(n.target)
    return _op_name(n) or getattr(n.target, "__qualname__", str(n.target))


def _describe(n: fx.Node, why: str) -> str:
    return f"stack_models: cannot stack node {n.name!r} ({n.op} {_target_name(n)}) at {_source_line(n)}: {why}"


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------------------------- building
class _Builder:
    def __init__(self, models: list[nn.Module]) -> None:
        self.models, self.k, self.m0 = models, len(models), models[0]
        self.g = fx.Graph()
        self.env: dict[fx.Node, tuple[Any, str]] = {}
        self.root: dict[str, Any] = {}
        self.per_branch: set[str] = set()
        self.grouped_paths: set[str] = set()
        self.shared_attrs: set[str] = set()
        # False while the models' own forward, with grouped layers swapped in, computes what the graph does
        self.rewritten = False
        self.moved: dict[str, str] = {}  # a model's parameter -> its name in the stacked model (functional layers)

    # -- helpers
    def new(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n][0])

    def kinds(self, a: Any) -> list[str]:
        found: list[str] = []
        fx.node.map_arg(a, lambda n: found.append(self.env[n][1]))
        return found

    def nodes_in(self, a: Any) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg(a, found.append)
        return found

    def plain(self, n: Any) -> Any:
        return n.meta.get("groupnet_plain") if isinstance(n, fx.Node) else n

    def tensor_meta(self, n: fx.Node) -> _T:
        t = self.plain(n)
        if not isinstance(t, _T):
            raise _Refuse(f"expected a tensor, the example run gave {type(t).__name__}")
        return t

    def call(self, fn: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        if getattr(fn, "__module__", None) == ops.__name__ and fn is not ops.branch_input:
            self.rewritten = True
        return self.g.call_function(fn, args, kwargs or {})

    # -- the pass
    def build(self, graph: fx.Graph) -> fx.GraphModule:
        for n in graph.nodes:
            try:
                value, kind = self.visit(n)
                if kind == B:
                    t = self.plain(n)
                    if not isinstance(t, _T) or t.rank < 2:
                        raise _Refuse(f"its result {t.shape if isinstance(t, _T) else t!r} has fewer than 2 dims, so "
                                      "the stacked layout (N, K*C, ...) cannot hold the K branches' results")
            except _Refuse as r:
                raise StackingError(_describe(n, str(r))) from None
            self.env[n] = (value, kind)
        name = f"Stacked{type(self.m0).__name__}"
        gm = fx.GraphModule(self.root, self.g, class_name=name)
        gm.train(self.m0.training)
        return gm

    def visit(self, n: fx.Node) -> tuple[Any, str]:
        if n.op == "placeholder":
            if not any(v[1] == B for v in self.env.values()):
                t = self.tensor_meta(n)
                if t.rank < 2:
                    raise _Refuse(f"the input has shape {t.shape}; stacking needs (N, C, ...)")
                return self.call(ops.branch_input, (self.g.placeholder(n.name), self.k, t.shape[1])), B
            if n.args:
                return self.g.placeholder(n.name, default_value=n.args[0]), S
            raise _Refuse("stacking supports one tensor input (the branch-stacked (N, K*C, ...) batch)")
        if n.op == "get_attr":
            return self.get_attr(n)
        if n.op == "call_module":
            return self.call_module(n)
        if n.op == "output":
            if P in self.kinds(n.args):
                raise _Refuse("the model returns a per-branch parameter")
            return self.g.output(self.new(n.args[0])), S
        return self.call_op(n)

    def get_attr(self, n: fx.Node) -> tuple[Any, str]:
        target = n.target
        values = [_fetch(m, target) for m in self.models]
        if target == "training" and isinstance(values[0], bool):
            self.root["training"] = values[0]
            return self.g.get_attr("training"), S
        if not isinstance(values[0], Tensor):
            raise _Refuse(f"reads attribute {target} of type {type(values[0]).__name__}, which stacking cannot copy")
        v0 = values[0]
        same = all(isinstance(v, Tensor) and v.shape == v0.shape and v.dtype == v0.dtype for v in values)
        if not same:
            raise _Refuse(f"attribute {target} differs in shape or dtype between the models")
        if isinstance(v0, nn.Parameter) or not all(torch.equal(v, v0) for v in values[1:]):
            stacked = torch.stack([v.detach() for v in values])
            # parameters stay per branch even when equal now: training would otherwise tie the branches
            self.root[target] = nn.Parameter(stacked, v0.requires_grad) if isinstance(v0, nn.Parameter) else stacked
            self.per_branch.add(target)
            self.rewritten = True
            return self.g.get_attr(target), P
        self.root[target] = v0
        self.shared_attrs.add(target)
        return self.g.get_attr(target), S

    # -- modules
    def call_module(self, n: fx.Node) -> tuple[Any, str]:
        target = n.target
        mods = [m.get_submodule(target) for m in self.models]
        m0 = mods[0]
        kinds = self.kinds((n.args, n.kwargs))
        if is_grouped_layer(m0):
            raise _Refuse(f"{type(m0).__name__} is already a grouped layer; stack plain models")
        grouped_cls = grouped_class_for(type(m0))
        if grouped_cls is not None:
            if len(n.args) != 1 or n.kwargs or kinds != [B]:
                raise _Refuse(f"{type(m0).__name__} must be called on one branch-carrying tensor")
            rank = self.tensor_meta(n.args[0]).rank
            need = {nn.Conv2d: (4,), nn.BatchNorm2d: (4,), nn.BatchNorm1d: (2, 3)}.get(type(m0))
            if need is not None and rank not in need:
                raise _Refuse(f"{type(m0).__name__} on a {rank}-d input (stacking needs {need})")
            try:
                grouped = grouped_cls.from_modules(mods)
            except (ValueError, TypeError) as e:
                raise type(e)(f"stack_models: at model.{target}: {e}") from e
            self.root[target] = grouped
            self.grouped_paths.add(target)
            x = self.new(n.args[0])
            if isinstance(m0, (nn.Linear, nn.LayerNorm)) and rank > 2:  # the grouped op reads branches in the last dim
                y = self.g.call_module(target, (self.call(ops.branch_to_last, (x, self.k)),))
                return self.call(ops.branch_from_last, (y, self.k)), B
            return self.g.call_module(target, (x,)), B
        for i, m in enumerate(mods[1:], start=1):
            if type(m) is not type(m0) or repr(m) != repr(m0):
                raise ValueError(f"stack_models: at model.{target}, model {i} has {m!r}, model 0 has {m0!r}")
        if any(True for _ in chain(m0.parameters(), m0.buffers())):
            raise _Refuse(f"no grouped counterpart for {type(m0).__name__} with parameters")
        if kinds != [B] or n.kwargs or len(n.args) != 1:
            raise _Refuse(f"{type(m0).__name__} must be called on one branch-carrying tensor")
        x, rank = self.new(n.args[0]), self.tensor_meta(n.args[0]).rank
        if isinstance(m0, nn.Flatten):
            return self.flatten(x, rank, m0.start_dim, m0.end_dim), B
        if isinstance(m0, (nn.Softmax, nn.LogSoftmax)):
            fn = "F.softmax" if isinstance(m0, nn.Softmax) else "F.log_softmax"
            return self.along_dims(fn, x, rank, (), {"dim": m0.dim}, "dim", None), B
        if isinstance(m0, nn.Unflatten):
            return self.along_dims("method.unflatten", x, rank, (m0.dim, m0.unflattened_size), {}, 0, None), B
        if isinstance(m0, nn.ChannelShuffle):
            return self.call(ops.channel_shuffle, (x, self.k, m0.groups)), B
        need = _PER_CHANNEL_MODULES.get(type(m0), ())
        if need == ():
            raise _Refuse(f"stacking knows no rule for {type(m0).__name__}: it cannot tell whether it acts on each "
                          "branch's channels separately")
        if need is not None and rank not in need:
            raise _Refuse(f"{type(m0).__name__} on a {rank}-d input acts across channels (it expects {need})")
        self.root[target] = copy.deepcopy(m0)
        return self.g.call_module(target, (x,)), B

    # -- functions and methods
    def call_op(self, n: fx.Node) -> tuple[Any, str]:
        name = _op_name(n)
        kinds = self.kinds((n.args, n.kwargs))
        if not any(k in (B, P, BT) for k in kinds):  # shared values only: the same for every branch
            return self.g.create_node(n.op, n.target, self.new(n.args), self.new(n.kwargs)), S
        if n.target is operator.getitem:
            return self.getitem(n)
        if n.target is getattr:
            return self.getattr(n)
        if name is None:
            raise _Refuse("stacking knows no rule for this function: it cannot tell whether it acts on each "
                          "branch's channels separately")
        space, _, op = name.partition(".")
        if op in _ELEMENTWISE:
            return self.elementwise(n, name)
        if name in ("F.conv2d", "F.linear", "torch.conv2d"):
            return self.functional_layer(n, "conv2d" if "conv2d" in name else "linear")
        if P in kinds:
            raise _Refuse(f"{name} reads a per-branch tensor (a parameter or buffer of the models) and has no "
                          "grouped counterpart; use nn.Conv2d / nn.Linear / nn.LayerNorm modules")
        if op not in _KNOWN:
            raise _Refuse(f"stacking knows no rule for {name}: it cannot tell whether it acts on each branch's "
                          "channels separately")
        x = n.args[0] if n.args else next(iter(n.kwargs.values()))
        if op in ("cat", "concat", "concatenate", "stack"):
            return self.cat(n, op)
        if not isinstance(x, fx.Node) or self.env[x][1] != B or kinds.count(B) + kinds.count(BT) != 1:
            raise _Refuse(f"{name} on these operands: stacking handles it on one branch-carrying tensor")
        meta = self.tensor_meta(x)
        nx, rank = self.new(x), meta.rank
        args, kwargs = self.new(n.args[1:]), self.new(n.kwargs)
        if any(isinstance(self.plain(a), _T) for a in self.nodes_in((n.args[1:], n.kwargs))):
            raise _Refuse(f"{name} with a second tensor operand (stacking keeps it only among elementwise ops)")
        if op in _UNARY:
            need = _UNARY[op]
            if need is not None and rank not in need:
                raise _Refuse(f"{name} on a {rank}-d input acts across channels (it expects {need})")
            return self.g.create_node(n.op, n.target, (nx, *args), kwargs), B
        if op in ("size",):
            return self.call(ops.plain_size, (nx, self.k, *args), kwargs), S
        if op in ("dim", "ndimension"):
            return self.g.create_node(n.op, n.target, (nx, *args), kwargs), S
        if op == "numel":
            return self.call(ops.plain_numel, (nx, self.k)), S
        if op == "flatten":
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            return self.flatten(nx, rank, start, end), B
        if op in ("view", "reshape"):
            shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if "shape" in n.kwargs:
                shape = n.kwargs["shape"]
            if len(shape) == 1 and isinstance(shape[0], fx.Node) and isinstance(self.plain(shape[0]), tuple):
                shape = shape[0]  # one size tuple computed in the forward (e.g. another tensor's .shape)
            if any(self.env[s][1] != S or isinstance(self.plain(s), _T) for s in self.nodes_in(shape)) or not shape:
                raise _Refuse(f"{name} with these arguments")
            out = self.tensor_meta(n)
            if out.shape[0] != meta.shape[0]:
                raise _Refuse(f"reshapes {meta.shape} to {out.shape}: dim 0 changes, so values move between samples "
                              "and the branches' values would mix")
            shape = shape if isinstance(shape, fx.Node) else tuple(shape)
            return self.call(ops.reshape_per_sample, (nx, self.k, self.new(shape))), B
        if op in ("view_as", "reshape_as"):
            other = n.args[1]
            return self.call(ops.reshape_per_sample, (nx, self.k, self.call(ops.plain_size, (self.new(other), self.k)))), B
        if op == "permute":
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            dims = n.kwargs.get("dims", dims)
            dims = [self.norm_dim(d, rank) for d in dims]
            if dims[0] != 0:
                raise _Refuse("permute moves the batch dim")
            if dims[1] == 1:
                return self.g.create_node(n.op, n.target, (nx, *args), kwargs), B
            return self.call(ops.along_branch_dims, ("method.permute", nx, self.k, (0, 1, *(d + 1 for d in dims[1:])))), B
        if op in _TRANSPOSE:
            given = [*n.args[1:3], *(n.kwargs[key] for key in ("dim0", "dim1") if key in n.kwargs)]
            if len(given) != 2:
                raise _Refuse(f"{name} with these arguments")
            d = [self.norm_dim(v, rank) for v in given]
            if 0 in d:
                raise _Refuse(f"{name} moves the batch dim")
            if 1 not in d:
                return self.g.create_node(n.op, n.target, (nx, *args), kwargs), B
            return self.call(ops.along_branch_dims, (f"method.{op}", nx, self.k, d[0] + 1, d[1] + 1)), B
        if op == "squeeze" and len(n.args) == 1 and "dim" not in n.kwargs:
            return self.call(ops.squeeze_all, (nx, self.k)), B
        if op == "channel_shuffle":
            groups = n.args[1] if len(n.args) > 1 else n.kwargs["groups"]
            return self.call(ops.channel_shuffle, (nx, self.k, self.new(groups))), B
        if op == "pad":
            pad = n.args[1] if len(n.args) > 1 else n.kwargs["pad"]
            if isinstance(pad, fx.Node) or len(pad) // 2 > rank - 2:
                raise _Refuse("pads the channel or batch dim")
            return self.g.create_node(n.op, n.target, (nx, *args), kwargs), B
        if op in _REDUCE or op in _DIM_AT:
            fn = name
            return self.along_dims(fn, nx, rank, args, kwargs, _DIM_AT.get(op, 1) - 1, n, op=op)
        raise _Refuse(f"stacking knows no rule for {name}: it cannot tell whether it acts on each branch's channels "
                      "separately")

    def functional_layer(self, n: fx.Node, op: str) -> tuple[Any, str]:
        """``F.conv2d(x, self.weight, self.bias, ...)`` / ``F.linear(x, self.weight, self.bias)`` on the models' own
        parameters: the grouped layer, built from K plain layers holding those parameters."""
        names = (["input", "weight", "bias", "stride", "padding", "dilation", "groups"] if op == "conv2d"
                 else ["input", "weight", "bias"])
        given = dict(zip(names, n.args)) | dict(n.kwargs)
        x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
        if not isinstance(x, fx.Node) or self.env[x][1] != B:
            raise _Refuse(f"F.{op} on an input that does not carry the branches")
        params = [p for p in (weight, bias) if p is not None]
        for p in params:
            if not (isinstance(p, fx.Node) and p.op == "get_attr" and self.env[p][1] == P and len(p.users) == 1):
                raise _Refuse(f"F.{op} with a weight or bias that is not a parameter of the model read only here "
                              "(computed or shared weights have no grouped counterpart)")
        rest = {k: v for k, v in given.items() if k not in ("input", "weight", "bias")}
        computed: list[fx.Node] = []
        fx.node.map_arg(rest, computed.append)
        if computed:
            raise _Refuse(f"F.{op} with arguments computed in the forward")
        rank = self.tensor_meta(x).rank
        if op == "conv2d" and rank != 4:
            raise _Refuse(f"F.conv2d on a {rank}-d input (stacking needs 4)")
        plain = []
        for m in self.models:
            w = _fetch(m, weight.target)
            b = _fetch(m, bias.target) if bias is not None else None
            if op == "conv2d":
                g = rest.get("groups", 1)
                layer = nn.Conv2d(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), rest.get("stride", 1),
                                  rest.get("padding", 0), rest.get("dilation", 1), g, bias=b is not None,
                                  device=w.device, dtype=w.dtype)
            else:
                layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            plain.append(layer)
        try:
            grouped = grouped_class_for(type(plain[0])).from_modules(plain)
        except (ValueError, TypeError) as e:
            raise _Refuse(f"no grouped counterpart for these F.{op} arguments ({e})") from None
        owner = weight.target.rpartition(".")[0]
        path = f"{owner}.{n.name}" if owner else n.name
        for p, local in ((weight, "weight"), (bias, "bias")):
            if p is not None:  # the parameter now lives in the grouped layer only
                self.g.erase_node(self.env[p][0])
                del self.root[p.target]
                self.per_branch.discard(p.target)
                self.moved[p.target] = f"{path}.{local}"
        self.root[path] = grouped
        self.grouped_paths.add(path)
        nx = self.new(x)
        if op == "linear" and rank > 2:
            y = self.g.call_module(path, (self.call(ops.branch_to_last, (nx, self.k)),))
            return self.call(ops.branch_from_last, (y, self.k)), B
        return self.g.call_module(path, (nx,)), B

    def norm_dim(self, d: Any, rank: int) -> int:
        if not isinstance(d, int):
            raise _Refuse(f"a dim argument computed in the forward ({d}); stacking needs a constant")
        if not -rank <= d < rank:
            raise _Refuse(f"dim {d} out of range for a {rank}-d tensor")
        return d % rank

    def along_dims(self, fn: str, nx: Any, rank: int, args: tuple, kwargs: dict, pos: Any, n: fx.Node | None,
                   op: str = "") -> tuple[Any, str]:
        """An op with dim arguments: kept when its dims are all >= 2, rewritten on the expanded view when one is 1."""
        args, kwargs = list(args), dict(kwargs)
        where, key = (None, pos) if isinstance(pos, str) else ((pos if pos < len(args) else None), "dim")
        if where is not None:
            dim = args[where]
        elif key in kwargs:
            dim = kwargs[key]
        elif op in _DEFAULT_DIM:
            dim = _DEFAULT_DIM[op]
        else:
            raise _Refuse(f"{fn} without a dim acts across the whole tensor, channels and batch included")
        dims = [self.norm_dim(d, rank + (op == "unsqueeze")) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
        if 0 in dims:
            raise _Refuse(f"{fn} along dim 0 acts across the batch")
        kind = self.result_kind(n) if n is not None else B
        if 1 not in dims:  # dims 0 and 1 untouched: the op acts within each channel
            if n is not None:
                return self.g.create_node(n.op, n.target, self.new(n.args), self.new(n.kwargs)), kind
            return self.call(ops.plain_call, (fn, nx, *args), kwargs), kind
        shifted = [d + 1 for d in dims]
        new_dim: Any = type(dim)(shifted) if isinstance(dim, (tuple, list)) else shifted[0]
        if where is not None:
            args[where] = new_dim
        else:
            kwargs[key] = new_dim
        return self.call(ops.along_branch_dims, (fn, nx, self.k, *args), kwargs), kind

    def result_kind(self, n: fx.Node) -> str:
        return BT if isinstance(self.plain(n), tuple) else B

    def flatten(self, nx: Any, rank: int, start: int, end: int) -> Any:
        if self.norm_dim(start, rank) == 0 and rank > 0:
            raise _Refuse("flattens the batch dim into the others")
        return self.call(torch.flatten, (nx, start, end))

    def cat(self, n: fx.Node, op: str) -> tuple[Any, str]:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if isinstance(tensors, fx.Node) or any(not isinstance(t, fx.Node) or self.env[t][1] != B for t in tensors):
            raise _Refuse(f"torch.{op} of tensors that are not all branch-carrying (a shared or per-branch tensor "
                          "among them)")
        rank = self.tensor_meta(tensors[0]).rank
        d = self.norm_dim(dim, rank + (op == "stack"))
        if d == 0:
            raise _Refuse(f"torch.{op} along dim 0 (the batch)" if op == "stack" else "")
        new = [self.new(t) for t in tensors]
        if d == 1:
            return self.call(ops.stack_channels if op == "stack" else ops.cat_channels, (new, self.k)), B
        return self.call(torch.stack if op == "stack" else torch.cat, (new, d)), B

    def getitem(self, n: fx.Node) -> tuple[Any, str]:
        x, idx = n.args
        kind = self.env[x][1]
        if kind == BT:
            if not isinstance(idx, int):
                raise _Refuse("indexes a tuple of branch-carrying tensors with a non-constant")
            return self.call(operator.getitem, (self.env[x][0], idx)), B
        if kind != B:
            raise _Refuse("indexes a per-branch parameter")
        if any(self.env[i][1] != S or isinstance(self.plain(i), _T) for i in self.nodes_in(idx)):
            raise _Refuse("indexes with a tensor (advanced indexing is not rewritten)")
        return self.call(ops.getitem_per_sample, (self.env[x][0], self.k, self.new(idx))), B

    def getattr(self, n: fx.Node) -> tuple[Any, str]:
        x, attr = n.args[0], n.args[1]
        if self.env[x][1] != B:
            raise _Refuse(f"reads .{attr} of a per-branch tensor")
        if attr == "shape":
            return self.call(ops.plain_size, (self.env[x][0], self.k)), S
        if attr in _SHARED_ATTRS:
            return self.call(getattr, (self.env[x][0], attr)), S
        raise _Refuse(f"reads .{attr} of a branch-carrying tensor")

    def elementwise(self, n: fx.Node, name: str) -> tuple[Any, str]:
        if any(k in (P, B, BT) for k in self.kinds(n.kwargs)):
            raise _Refuse(f"{name} with a tensor passed by keyword")
        out = self.tensor_meta(n)
        r = out.rank
        kinds, direct = [], True
        for a in n.args:
            if not isinstance(a, fx.Node):
                kinds.append("-")
                continue
            kind, t = self.env[a][1], self.plain(a)
            if kind == BT:
                raise _Refuse(f"{name} on a tuple")
            if kind == B:
                if t.rank != r:
                    raise _Refuse(f"{name} broadcasts a {t.rank}-d branch-carrying tensor against a {r}-d result, "
                                  "which lines up its batch dim with another dim")
                direct &= t.shape[1] == out.shape[1]
                kinds.append("B")
            elif kind == P:
                direct = False
                kinds.append("P")
            elif isinstance(t, _T):
                at = t.rank - (r - 1)
                direct &= at < 0 or t.shape[at] == 1
                kinds.append("S")
            else:
                kinds.append("-")
        if "B" not in kinds:
            raise _Refuse(f"{name} combines per-branch parameters in the forward (without a branch-carrying tensor); "
                          "stacking keeps them only as operands of ops on the activations")
        if direct:
            return self.g.create_node(n.op, n.target, self.new(n.args), self.new(n.kwargs)), B
        return self.call(ops.elementwise, (name, self.k, "".join(kinds), r, *self.new(n.args)), self.new(n.kwargs)), B
