"""The torch path of the grouped convolution on CPU: one grouped ``F.conv2d`` or a loop of per-branch convs.

Measured on the 2-core development machine (torch 2.13 CPU, fp32, 3x3 convs; ``benchmarks/cpu_conv_strategies.py``,
numbers in ``benchmarks/NOTES.md``): with channels_last the grouped conv beat the loop forward and backward in every
shape tried; with NCHW oneDNN reorders the activations around a grouped conv and the loop sometimes wins the
backward. groupnet's models run channels_last, so ``grouped`` is the default; ``GROUPNET_CPU_CONV=loop`` selects the
per-branch loop (used by the benchmarks to compare).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_CONV_STRATEGIES = ("grouped", "loop")


def cpu_conv_strategy() -> str:
    choice = os.environ.get("GROUPNET_CPU_CONV", "grouped").lower()
    if choice not in CPU_CONV_STRATEGIES:
        raise ValueError(f"GROUPNET_CPU_CONV must be one of {CPU_CONV_STRATEGIES}, got {choice!r}")
    return choice


def conv2d_cpu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    branches: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """K convolutions of a channel-stacked input with the strategy chosen by ``GROUPNET_CPU_CONV``."""
    if cpu_conv_strategy() == "grouped" or branches == 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation, branches * groups)
    cin, cout = x.shape[1] // branches, weight.shape[0] // branches
    outs = [
        F.conv2d(
            x[:, k * cin : (k + 1) * cin],
            weight[k * cout : (k + 1) * cout],
            None if bias is None else bias[k * cout : (k + 1) * cout],
            stride,
            padding,
            dilation,
            groups,
        )
        for k in range(branches)
    ]
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.cat(outs, dim=1).contiguous(memory_format=memory_format)
