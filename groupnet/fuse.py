"""Inference-only rewrite of a model: batch norms folded into the convs before them, ReLUs and residual adds fused
into the conv as oneDNN post-ops.

In eval mode a batch norm is an affine map per channel, so ``bn(conv(x))`` is one conv with scaled weights and a
bias. On the branch-stacked layout this is per branch for free (channel ``c`` of the stacked conv is channel ``c`` of
the stacked batch norm). What is left after folding, ``relu(conv(x))``, ``conv(x) + y`` and ``relu(conv(x) + y)``,
runs as one ``torch.ops.mkldnn._convolution_pointwise`` call on CPU (the op torch.compile's CPU backend emits for the
same pattern), or as one fused Triton conv launch on the Triton backend (``groupnet.ops.grouped_conv2d_bias_act`` /
``grouped_conv2d_add``), so the activation is written once instead of two or three times. Measurements that decided this
are in ``benchmarks/NOTES.md``.

The model is traced with ``torch.fx`` (grouped layers as leaves). The zoo models (:class:`GroupedClassifier`) pick
their first conv by the input's shape, which fx cannot trace, so for them the stem conv and ``features`` are fused
and the model's own forward is kept.
"""

from __future__ import annotations

import copy
import operator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from groupnet.ops import backend_for, grouped_conv2d_add, grouped_conv2d_bias_act
from groupnet.ops.batch_norm_fold import fold_batch_norm as fold_conv_bn
from groupnet.modules.registry import grouped_class_for, grouped_types, is_grouped_layer

_LEAVES = grouped_types()  # traced as calls, not through their forward
_FOLDABLE_CONVS = (nn.Conv2d, grouped_class_for(nn.Conv2d))
_RELUS = {F.relu, torch.relu, torch.relu_}
_ADDS = {operator.add, operator.iadd, torch.add}


class FusedConv2d(nn.Module):
    """A conv with its batch norm folded in and, optionally, a residual input added and a ReLU applied.

    ``forward(x)`` or ``forward(x, residual)`` computes ``act(conv(x, weight, bias) [+ residual])``; ``groups`` is the
    total group count (``K*groups`` for a grouped conv). Inference only.
    """

    def __init__(self, weight: Tensor, bias: Tensor, *, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, relu: bool = False, add: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups, self.relu, self.add = groups, relu, add
        self.onednn = onednn_pointwise_available()  # looked up here, not per call (torch.compile traces forward)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.training:
            raise RuntimeError("FusedConv2d is inference-only (its batch norm is folded); fuse the trained model "
                               "again with groupnet.fuse.fuse_for_inference after training")
        if (residual is not None) != self.add:
            raise ValueError(f"FusedConv2d(add={self.add}) called with{'out' if self.add else ''} a residual input")
        if backend_for(x) == "triton":  # one fused conv kernel launch: bias, residual and ReLU in its epilogue
            conv = dict(branches=1, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                        activation="relu" if self.relu else None)
            if residual is None:
                return grouped_conv2d_bias_act(x, self.weight, self.bias, **conv)
            return grouped_conv2d_add(x, self.weight, self.bias, residual, **conv)
        if self.onednn and _use_onednn(x, self.weight, residual):
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                    "relu" if self.relu else "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", None, "relu" if self.relu else None, [], "")
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        in_channels, kernel = self.weight.shape[1] * self.groups, tuple(self.weight.shape[2:])
        return (f"{in_channels}, {self.weight.shape[0]}, kernel_size={kernel}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, add={self.add}, relu={self.relu}")


@lru_cache(maxsize=1)
def onednn_pointwise_available() -> bool:
    """True when this torch build has oneDNN's fused conv op (x86/ARM builds with mkldnn)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    try:
        x, w = torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
        return bool(torch.equal(y, x))
    except RuntimeError:  # pragma: no cover - depends on the build
        return False


def _use_onednn(x: Tensor, weight: Tensor, residual: Tensor | None) -> bool:
    # oneDNN takes fp32/bf16 CPU tensors of one dtype; the residual must match the output's layout and dtype.
    # float64 (the tests' precision) and everything else takes the plain torch path.
    ok = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
          and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
    if ok and residual is not None:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        ok = residual.dtype == x.dtype and residual.device == x.device and residual.is_contiguous(memory_format=layout)
    return ok


def fold_batch_norm(conv: nn.Module, bn: nn.BatchNorm2d) -> FusedConv2d:
    """``bn(conv(x))`` in eval mode as one conv (``conv``: a :class:`GroupedConv2d` or ``nn.Conv2d``)."""
    w = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if bn is not None:
        if bn.num_features != w.shape[0]:
            raise ValueError(f"cannot fold a batch norm of {bn.num_features} channels into a conv of {w.shape[0]}")
        gamma, beta = (bn.weight.detach(), bn.bias.detach()) if bn.affine else (None, None)
        w, bias = fold_conv_bn(w, bias, bn.running_mean.detach(), bn.running_var.detach(), gamma, beta, bn.eps)
    w = w.contiguous(memory_format=torch.channels_last) if conv.weight.is_contiguous(
        memory_format=torch.channels_last) else w.contiguous()
    groups = conv.branches * conv.groups if is_grouped_layer(conv) else conv.groups
    padding = conv.padding
    if isinstance(padding, str) or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"cannot fuse a conv with padding={padding!r}, padding_mode={conv.padding_mode!r}")
    return FusedConv2d(w.clone(), bias.clone(), stride=tuple(conv.stride), padding=tuple(padding),
                       dilation=tuple(conv.dilation), groups=groups)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_LEAVES, FusedConv2d)) or super().is_leaf_module(m, qualname)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in _RELUS:
        return True
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse_graph(module: nn.Module) -> fx.GraphModule:
    """Trace ``module`` with fx and fuse conv -> batch norm -> (add) -> (relu) chains in its graph."""
    gm = fx.GraphModule(module, _Tracer().trace(module))
    modules = dict(gm.named_modules())
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _FOLDABLE_CONVS):
            continue
        conv = modules[node.target]
        user = _single_user(node)
        bn = None
        if user is not None and user.op == "call_module" and _foldable_bn(modules.get(user.target)):
            bn = modules[user.target]
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            user = _single_user(node)
        fused = fold_batch_norm(conv, bn)
        residual_node = None
        if user is not None and user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 \
                and not user.kwargs and all(isinstance(a, fx.Node) for a in user.args):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is not node:
                residual_node, fused.add = other, True
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                user = _single_user(node)
        if user is not None and _is_relu(user, modules):
            fused.relu = True
            user.replace_all_uses_with(node)
            graph.erase_node(user)
        gm.add_submodule(node.target, fused)
        if residual_node is not None:
            node.args = (node.args[0], residual_node)
            _move_after(node, residual_node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _move_after(node: fx.Node, dependency: fx.Node) -> None:
    """Keep the graph topologically sorted when ``node`` gains an input defined after it."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[dependency] > order[node]:
        dependency.append(node)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An inference-only copy of ``model`` with batch norms folded and ReLU / residual adds fused into its convs.

    Same outputs as ``model.eval()`` (up to rounding). The copy raises if used in training mode; fuse the trained
    model again after more training. Works for the zoo models and for fx-traceable models of grouped or plain layers.
    """
    from groupnet.models.base import GroupedClassifier

    model = copy.deepcopy(model).eval()
    if isinstance(model, GroupedClassifier):
        _fold_stem(model)
        model.features = fuse_graph(model.features)
        model.execution_order = "grouped"  # branch-major execution slices grouped layers; the fused convs are not grouped
        return model.eval()
    try:
        return fuse_graph(model).eval()
    except (fx.proxy.TraceError, TypeError) as e:
        raise TypeError(f"fuse_for_inference: cannot trace {type(model).__name__} with torch.fx ({e})") from e


def _fold_stem(model: nn.Module) -> None:
    """Fold a batch norm that opens ``features`` (post-activation ResNets) into the stem conv, in place.

    The stem stays a :class:`GroupedConv2d` (the model's forward reads it for a shared input too), with the folded
    weights and a bias.
    """
    first = model.features[0] if isinstance(model.features, nn.Sequential) and len(model.features) else None
    if not _foldable_bn(first):
        return
    conv = model.conv1
    folded = fold_batch_norm(conv, first)
    with torch.no_grad():
        conv.weight.copy_(folded.weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(folded.bias.clone())
        else:
            conv.bias.copy_(folded.bias)
    model.features[0] = nn.Identity()
