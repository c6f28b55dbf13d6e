"""The optimisers: SGD with Nesterov momentum or AdamW, with weight decay on conv/linear weights only (not on norm
layers or biases)."""

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


def build_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float) -> torch.optim.Optimizer:
    """``"sgd"`` (:func:`build_sgd`) or ``"adamw"`` (torch's default betas; decoupled weight decay on the same
    parameter groups; ``momentum`` and ``nesterov`` are SGD's only)."""
    if name == "sgd":
        return build_sgd(model, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
