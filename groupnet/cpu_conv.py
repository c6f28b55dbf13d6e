"""The torch path of the grouped convolution on CPU: one grouped ``F.conv2d`` or a loop of per-branch convs.

``grouped`` (the default) runs the K branches as one oneDNN grouped conv (``groups=K*groups``); ``loop`` runs K
per-branch convs and concatenates (``GROUPNET_CPU_CONV=loop``, kept to compare). Measured per conv shape of the
benchmarked models, forward, input gradient and weight gradient separately, channels_last (``benchmarks/NOTES.md``
item 2; ``benchmarks/cpu_time_ab.py conv-passes``): the grouped conv was as fast as or faster than the loop for
nearly every shape and pass, single-threaded and with 2 threads, so there is no per-layer choice. (Whole training
steps of wide branches at large batch do run faster branch after branch, from cache locality across layers, not
from any conv: :mod:`groupnet.branch_major` handles that, NOTES.md item 8.)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_CONV_STRATEGIES = ("grouped", "loop")


def cpu_conv_strategy() -> str:
    """The strategy ``GROUPNET_CPU_CONV`` selects: ``"grouped"`` (default) or ``"loop"``."""
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
