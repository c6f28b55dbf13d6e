"""GroupedClassifier: what every zoo model shares (input handling, pooling, head, initialisation).

A model is ``conv1 -> features -> global average pool -> dropout -> head``. ``conv1`` reads either K per-branch
views ``(N, K*in_channels, H, W)`` or one shared view ``(N, in_channels, H, W)``; the shared view is read once by
one plain conv with ``K*stem_width`` outputs (the stacked weights of the K branches' first convs), which gives
exactly what K branch convs on K copies would, without copying the input.

Initialisation (each branch drawn independently, as K separately built networks would be): convs kaiming-normal
with fan_out of one branch (He et al.; pycls and the SplitNet code), BN gamma 1 and beta 0, the last BN gamma of
each residual block 0 when ``zero_init_residual`` (Goyal et al.; every block then starts as the identity), the
classifier N(0, 0.01) with zero bias (pycls; SplitNet uses a smaller std, which trained no better here).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from groupnet.branch_major import EXECUTION_ORDERS, branch_major_forward, hooked_modules, prefer_branch_major
from groupnet.ops import grouped_conv2d, prefers_channels_last
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear
from groupnet.modules.dynamic import DynamicGroupedConv2d


class GroupedClassifier(nn.Module):
    """Base of the zoo models: K branches of one :class:`ArchSpec`, logits ``(N, K*num_classes)``.

    Subclasses set ``self.conv1`` (the first conv, a :class:`GroupedConv2d`) and ``self.features`` (everything up
    to the global pool), then call :meth:`_finish`.
    """

    conv1: nn.Module
    features: nn.Module
    execution_order: str = "auto"

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        for name, v in (("branches", branches), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.spec = spec
        self.branches, self.num_classes, self.in_channels = branches, num_classes, in_channels
        self.drop_rate = spec.drop_rate

    def _finish(self, head_features: int) -> None:
        self.head = GroupedLinear(head_features, self.num_classes, branches=self.branches)
        init_weights(self, self.spec.zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, K*in_channels, H, W)`` or ``(N, in_channels, H, W)`` -> logits ``(N, K*num_classes)``.

        ``self.execution_order`` picks how the K branches run: ``"grouped"`` (every layer once for all branches),
        ``"branch"`` (branch after branch on views of the stacked weights, :mod:`groupnet.branch_major`), or
        ``"auto"`` (the default): branch-major on the CPU when the widest activation of all K branches outgrows half
        the last-level cache, grouped otherwise, under ``torch.compile`` and when modules carry forward hooks. All
        compute the same function.

        When the grouped convs run the Triton kernels on CUDA (:func:`groupnet.ops.prefers_channels_last`), an NCHW
        input is converted to channels_last once here, so every conv downstream reads contiguous channels (the
        weights should be channels_last too: ``model.to(memory_format=torch.channels_last)``, as the trainer does).
        """
        if isinstance(x, fx.Proxy):
            # symbolic tracing: the input checks and the execution-order choice read concrete sizes, so the traced
            # graph is the grouped path for K per-branch views (a shared view then fails the first conv's check)
            return self._grouped_forward(x, False)
        x = _channels_last_for_triton(x)
        shared = self._input_is_shared(x)
        if self._runs_branch_major(x):
            return branch_major_forward(self, x, shared_input=shared)
        return self._grouped_forward(x, shared)

    def _runs_branch_major(self, x: Tensor) -> bool:
        order = self.execution_order
        if order not in EXECUTION_ORDERS:
            raise ValueError(f"{type(self).__name__}.execution_order must be one of {EXECUTION_ORDERS}, got {order!r}")
        if self.branches == 1 or order == "grouped":
            return False
        if order == "branch":
            return True
        if torch.compiler.is_compiling():  # auto: a compiled graph fuses the grouped layers; K sub-calls would not
            return False
        widest = max(self.spec.stem_width, self.spec.widths[0])  # the first stage runs at the input's resolution
        stacked = x.shape[0] * self.branches * widest * x.shape[2] * x.shape[3] * x.element_size()
        return prefer_branch_major(stacked, x.device) and not hooked_modules(self)  # hooks need the grouped modules

    @property
    def schedule(self) -> str:
        """Deprecated alias of :attr:`execution_order`: warns, then reads or sets it, so older code keeps working."""
        _warn_schedule()
        return self.execution_order

    @schedule.setter
    def schedule(self, value: str) -> None:
        _warn_schedule()
        self.execution_order = value

    def _grouped_forward(self, x: Tensor, shared: bool) -> Tensor:
        x = self._first_conv(x, shared)
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.head(x)

    def _input_is_shared(self, x: Tensor) -> bool:
        """True for one view shared by all branches, False for K per-branch views; anything else is an error."""
        k, c = self.branches, self.in_channels
        if x.dim() == 4 and x.shape[1] in (k * c, c):
            return x.shape[1] != k * c
        expected = f"(N, {k * c}, H, W) (one view per branch)" + (
            f" or (N, {c}, H, W) (one view shared by all branches)" if k > 1 else ""
        )
        raise ValueError(f"{type(self).__name__} expects {expected}, got shape {tuple(x.shape)}")

    def _first_conv(self, x: Tensor, shared: bool) -> Tensor:
        if not shared:
            return self.conv1(x)
        conv = self.conv1
        # a dynamic-width first conv (network augmentation) runs its active output slice
        weight, bias = conv.active_parameters() if isinstance(conv, DynamicGroupedConv2d) else (conv.weight, conv.bias)
        return grouped_conv2d(x, weight, bias, branches=1, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, groups=conv.groups)

    def extra_repr(self) -> str:
        return f"branches={self.branches}, num_classes={self.num_classes}, in_channels={self.in_channels}"


def _channels_last_for_triton(x: Tensor) -> Tensor:
    """``x`` as channels_last when it is a 4-d CUDA tensor the Triton convs would otherwise read as NCHW (one copy
    of the batch); anything else unchanged."""
    if x.is_cuda and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        if prefers_channels_last(x.device):
            return x.contiguous(memory_format=torch.channels_last)
    return x


def _warn_schedule() -> None:
    warnings.warn("GroupedClassifier.schedule is deprecated: use execution_order", DeprecationWarning, stacklevel=3)


def conv3x3(w_in: int, w_out: int, branches: int, stride: int = 1, groups: int = 1) -> GroupedConv2d:
    return GroupedConv2d(w_in, w_out, 3, branches=branches, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(w_in: int, w_out: int, branches: int, stride: int = 1) -> GroupedConv2d:
    return GroupedConv2d(w_in, w_out, 1, branches=branches, stride=stride, bias=False)


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """Initialise every grouped layer of ``model`` branch by branch (see the module docstring).

    Meta tensors (models built under ``torch.device("meta")`` to count them) are left alone: there is nothing to
    draw, and torch's meta ``normal_`` is slow.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, GroupedConv2d):
            c = m.out_channels
            for k in range(m.branches):  # per-branch slice: fan_out of one branch, not of the stacked weight
                nn.init.kaiming_normal_(m.weight.data[k * c : (k + 1) * c], mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias.data)
        elif isinstance(m, GroupedBatchNorm2d):
            nn.init.ones_(m.weight.data)
            nn.init.zeros_(m.bias.data)
        elif isinstance(m, GroupedLinear):
            nn.init.normal_(m.weight.data, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias.data)
    if zero_init_residual:
        for m in model.modules():
            last_bn = getattr(m, "last_bn", None)
            if isinstance(last_bn, GroupedBatchNorm2d):
                nn.init.zeros_(last_bn.weight.data)
