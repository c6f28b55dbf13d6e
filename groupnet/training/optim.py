"""SGD with Nesterov momentum and weight decay on conv/linear weights only (not on norm layers or biases)."""

from __future__ import annotations

import torch
from torch import nn

from groupnet.modules.registry import norm_types

# torch's norm layers and the registry's grouped ones (grouped batch norms are torch batch norms as well)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, *norm_types())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (conv and linear weights) and not decayed (every norm-layer parameter and every bias).

    Decided by module type and parameter name, not by ``ndim``: a grouped linear bias is 2-d ``(K, out)``.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, _NORM_TYPES) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_sgd(model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)
