"""Stack K plain models into one grouped model, and take one branch back out as a plain model.

The rule is structural: every module whose type :mod:`groupnet.modules.registry` lists (conv, linear, batch norm,
layer norm) is replaced by its grouped counterpart built with ``from_modules``; parameter-free modules (activations,
pooling, dropout, flatten) are copied from the first model, since they act per channel on the branch-stacked layout.
This holds for models whose forward uses only per-channel ops between layers (the usual CNN/MLP); a forward that
reshapes across channels (e.g. ``x.view(-1, C)``) needs a model written for the layout, like the models in
:mod:`groupnet.models`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from groupnet.modules.registry import grouped_class_for, is_grouped_layer

__all__ = ["extract_branch", "is_grouped_layer", "num_branches", "stack_models"]


def num_branches(model: nn.Module) -> int:
    """K of a grouped layer or model (every grouped layer inside must agree)."""
    ks = {m.branches for m in model.modules() if is_grouped_layer(m)}
    if not ks:
        raise ValueError(f"{type(model).__name__} holds no grouped layer")
    if len(ks) > 1:
        raise ValueError(f"{type(model).__name__} mixes grouped layers with different branch counts {sorted(ks)}")
    return ks.pop()


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One grouped model equal to the K given plain models of identical architecture (weights copied).

    The result takes the branch-stacked input ``(N, K*C, H, W)`` and returns ``(N, K*out)``.
    """
    if len(models) == 0:
        raise ValueError("stack_models needs at least one model")
    return _stack(list(models), "model")


def _stack(mods: list[nn.Module], path: str) -> nn.Module:
    t = type(mods[0])
    for i, m in enumerate(mods):
        if type(m) is not t:
            raise TypeError(f"stack_models: at {path}, model {i} has {type(m).__name__}, model 0 has {t.__name__}")
    grouped = grouped_class_for(t)
    if grouped is not None:
        try:
            return grouped.from_modules(mods)
        except (ValueError, TypeError) as e:
            raise type(e)(f"stack_models: at {path}: {e}") from e
    names = [n for n, _ in mods[0].named_children()]
    for i, m in enumerate(mods):
        if [n for n, _ in m.named_children()] != names:
            raise ValueError(f"stack_models: at {path}, model {i} has different submodules than model 0")
    if not names and (list(mods[0].parameters(recurse=False)) or list(mods[0].buffers(recurse=False))):
        raise TypeError(f"stack_models: at {path}, no grouped counterpart for {t.__name__} with parameters")
    if list(mods[0].parameters(recurse=False)):
        raise TypeError(f"stack_models: at {path}, {t.__name__} holds its own parameters; it cannot be stacked")
    out = copy.deepcopy(mods[0])
    if isinstance(getattr(out, "branches", None), int):
        out.branches = len(mods)
    for name in names:
        setattr(out, name, _stack([getattr(m, name) for m in mods], f"{path}.{name}"))
    return out


def extract_branch(model: nn.Module, k: int) -> nn.Module:
    """A plain copy of branch k of a grouped layer or model, with no grouped layers inside.

    Grouped layers become their ``branch(k)``; other modules are copied, and an int attribute ``branches`` on
    them (as the models in :mod:`groupnet.models` hold) is set to 1.
    """
    n = num_branches(model)
    if not 0 <= k < n:
        raise IndexError(f"branch index must be in [0, {n}), got {k}")
    return _extract(model, k)


def _extract(model: nn.Module, k: int) -> nn.Module:
    if is_grouped_layer(model):
        return model.branch(k)
    out = copy.deepcopy(model)
    _replace_grouped(out, model, k)
    return out


def _replace_grouped(target: nn.Module, source: nn.Module, k: int) -> None:
    if isinstance(getattr(target, "branches", None), int):
        target.branches = 1
    for name, child in source.named_children():
        if is_grouped_layer(child):
            setattr(target, name, child.branch(k))
        else:
            _replace_grouped(getattr(target, name), child, k)
