"""GroupedConv2d: K independent 2-d convolutions run as one grouped op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groupnet import _checks
from groupnet.ops import grouped_conv2d
from groupnet.modules._branch_params import check_branch_index, check_branch_modules, load_branch, split_rows
from groupnet.modules._fx import leaf_call
from groupnet.modules.branchwise import BranchSkeletonMixin

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
"""``padding_mode`` values, as ``nn.Conv2d`` takes them."""


class GroupedConv2d(BranchSkeletonMixin, nn.Module):
    """K independent ``nn.Conv2d`` layers on a channel-stacked input ``(N, K*in_channels, H, W)``.

    Sizes are per branch. ``weight`` is ``(K*out_channels, in_channels/groups, kh, kw)`` (branch k owns rows
    ``[k*out_channels, (k+1)*out_channels)``), ``bias`` is ``(K*out_channels,)``. Each branch is initialised
    exactly as ``nn.Conv2d`` initialises itself (same fan-in, same random stream as K convs built one after another).
    ``padding`` (ints, ``"same"`` or ``"valid"``) and ``padding_mode`` (``"zeros"``, ``"reflect"``, ``"replicate"``,
    ``"circular"``) mean what they mean for ``nn.Conv2d``; padding acts per channel, hence per branch.

    Example:
        >>> conv = GroupedConv2d(16, 32, 3, branches=4, padding=1)
        >>> conv(torch.randn(8, 4 * 16, 32, 32)).shape
        torch.Size([8, 128, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        branches: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _checks.check_positive(in_channels=in_channels, out_channels=out_channels, branches=branches, groups=groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels, self.out_channels, self.branches, self.groups = in_channels, out_channels, branches, groups
        self.kernel_size = _checks.pair(kernel_size, "kernel_size")
        self.stride = _checks.pair(stride, "stride")
        self.dilation = _checks.pair(dilation, "dilation")
        _checks.check_positive(kernel_size=min(self.kernel_size), stride=min(self.stride), dilation=min(self.dilation))
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride={self.stride}")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _checks.pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be >= 0, got {self.padding}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._input_pad, self._conv_padding = _padding_plan(self.padding, padding_mode, self.kernel_size,
                                                            self.dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(branches * out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(branches * out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each branch as ``nn.Conv2d.reset_parameters`` would, branch after branch."""
        fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        c = self.out_channels
        with torch.no_grad():
            for k in range(self.branches):
                nn.init.kaiming_uniform_(self.weight[k * c : (k + 1) * c], a=math.sqrt(5))
                if self.bias is not None:
                    nn.init.uniform_(self.bias[k * c : (k + 1) * c], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        traced = leaf_call(self, x)
        if traced is not None:
            return traced
        if self._input_pad is not None:
            x = _pad_input(x, self._input_pad, self.padding_mode)
        return grouped_conv2d(
            x,
            self.weight,
            self.bias,
            branches=self.branches,
            stride=self.stride,
            padding=self._conv_padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def _traced_root(self, x: Tensor) -> Tensor:
        if self._input_pad is not None:
            x = _pad_input(x, self._input_pad, self.padding_mode)
        return F.conv2d(x, self.weight, self.bias, self.stride, self._conv_padding, self.dilation,
                        self.branches * self.groups)

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """The K branches' parameters as views (autograd flows back to the stacked ones), named as in ``branch(k)``."""
        names = ["weight"] + ([] if self.bias is None else ["bias"])
        return split_rows({n: getattr(self, n) for n in names}, self.branches)

    def branch(self, k: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding a copy of branch k's weights."""
        check_branch_index(k, self.branches)
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return load_branch(conv, self.branch_tensors()[k])

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Conv2d]) -> GroupedConv2d:
        """Stack K ``nn.Conv2d`` of one configuration into a grouped conv (weights copied)."""
        def config(m: nn.Conv2d) -> tuple:
            return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                    m.bias is not None, m.padding_mode, m.weight.dtype)

        check_branch_modules(modules, nn.Conv2d, config)
        m0 = modules[0]
        out = cls(
            m0.in_channels, m0.out_channels, m0.kernel_size, branches=len(modules), stride=m0.stride,
            padding=m0.padding, dilation=m0.dilation, groups=m0.groups, bias=m0.bias is not None,
            padding_mode=m0.padding_mode, device=m0.weight.device, dtype=m0.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in modules]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in modules]))
        return out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, branches={self.branches}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def _padding_plan(padding: tuple[int, int] | str, mode: str, kernel_size: tuple[int, int],
                  dilation: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """(F.pad amounts (left, right, top, bottom) applied to the input first, or None; the conv's own padding).

    Zero padding the conv can do itself stays in the conv; other modes, and the uneven split of ``"same"`` (the
    extra row/column goes to the bottom/right, as in ``nn.Conv2d``), pad the input first.
    """
    if padding == "valid":
        return None, (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        (top, left) = (totals[0] // 2, totals[1] // 2)
        (bottom, right) = (totals[0] - top, totals[1] - left)
    else:
        assert not isinstance(padding, str)
        top = bottom = padding[0]
        left = right = padding[1]
    if mode == "zeros" and (top, left) == (bottom, right):
        return None, (top, left)
    return (left, right, top, bottom), (0, 0)


def _pad_input(x: Tensor, amounts: tuple[int, int, int, int], mode: str) -> Tensor:
    """``x`` padded per channel (``F.pad``), keeping channels_last when ``x`` has it."""
    y = F.pad(x, amounts, mode="constant" if mode == "zeros" else mode)
    return y.contiguous(memory_format=torch.channels_last) if _checks.is_channels_last(x) else y
