"""Converters between a grouped model and the ``torch.func.stack_module_state`` format of torch's ensembling recipe.

torch's recipe keeps K models as ``(params, buffers)``: two dicts from each plain parameter/buffer name to a tensor
with a leading branch axis ``(K, ...)``, run with ``torch.vmap`` over ``torch.func.functional_call`` on a plain
skeleton. :func:`to_stacked_state` gives exactly what ``stack_module_state`` gives for the K extracted branches
(``[extract_branch(model, k) for k in range(K)]``); :func:`load_stacked_state` writes such dicts back into a grouped
model, in place. The names are those of the plain branch, so either side's optimizer state does not carry over.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from groupnet.model_stacking import extract_branch, num_branches
from groupnet.modules.registry import is_grouped_layer

__all__ = ["load_stacked_state", "to_stacked_state"]


def to_stacked_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``torch.func.stack_module_state`` of the K branches of ``model``: ``(params, buffers)``, each tensor
    ``(K, ...)``; parameters are new leaves that require grad, as ``stack_module_state`` makes them."""
    k = num_branches(model)
    return torch.func.stack_module_state([extract_branch(model, i) for i in range(k)])


@torch.no_grad()
def load_stacked_state(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor] | None = None) -> None:
    """Copy ``(params, buffers)`` in the ``stack_module_state`` format into ``model`` (in place).

    Every parameter (and buffer, when ``buffers`` is given) of a branch must be present with a leading axis of K.
    A grouped layer takes branch k's slice into its branch-k rows; a parameter or buffer outside the grouped layers
    is shared by the branches, so its K slices must be equal. ``num_batches_tracked`` is one counter per grouped
    batch norm: its K entries must agree.
    """
    k = num_branches(model)
    targets = _branch_targets(model, k)
    wanted = {name for name, kind in _plain_names(model) if kind == "param" or buffers is not None}
    given = dict(params)
    if buffers is not None:
        given.update(buffers)
    missing = sorted(wanted - set(given))
    unexpected = sorted(set(given) - {name for name, _ in _plain_names(model)})
    if missing or unexpected:
        raise KeyError(f"load_stacked_state: missing {missing}, unexpected {unexpected}")
    for name in sorted(wanted):
        value = given[name]
        if value.dim() == 0 or value.shape[0] != k:
            raise ValueError(f"load_stacked_state: {name} must have a leading axis of K={k}, got shape "
                             f"{tuple(value.shape)}")
        views, shared = targets[name]
        if shared is not None:
            if not all(torch.equal(value[0], value[i]) for i in range(1, k)):
                raise ValueError(f"load_stacked_state: {name} is shared by the branches of the grouped model, but "
                                 "its K slices differ")
            shared.copy_(value[0])
            continue
        for i, view in enumerate(views):
            if tuple(view.shape) != tuple(value.shape[1:]):
                raise ValueError(f"load_stacked_state: {name} has shape {tuple(value.shape[1:])} per branch, the "
                                 f"model's has {tuple(view.shape)}")
            view.copy_(value[i])


def _plain_names(model: nn.Module) -> list[tuple[str, str]]:
    """(name, "param"/"buffer") of one extracted branch's state, without copying the model's tensors."""
    skeleton = extract_branch(model, 0)
    out = [(n, "param") for n, _ in skeleton.named_parameters()]
    out += [(n, "buffer") for n, _ in skeleton.named_buffers()]
    return out


def _branch_targets(model: nn.Module, k: int) -> dict[str, tuple[list[Tensor], Tensor | None]]:
    """Plain name -> (the K branch views to write, or the one shared tensor) of every parameter and buffer."""
    targets: dict[str, tuple[list[Tensor], Tensor | None]] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if is_grouped_layer(module):
            per_branch = module.branch_tensors()
            for name in per_branch[0]:
                full = prefix + name
                if name == "num_batches_tracked":
                    targets[full] = ([], getattr(module, name))  # one counter, shared by the branches
                else:
                    targets[full] = ([per_branch[i][name] for i in range(k)], None)
            return
        for name, p in module._parameters.items():
            if p is not None:
                targets[prefix + name] = ([], p)
        for name, b in module._buffers.items():
            if b is not None:
                targets[prefix + name] = ([], b)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return targets
