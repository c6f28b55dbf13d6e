"""Stack K plain models into one grouped model, and take one branch back out as a plain model.

:func:`stack_models` traces the models with torch.fx and rebuilds the graph for the branch-stacked layout
``(N, K*C, ...)`` (:mod:`groupnet.model_stacking.graph` says op by op what is kept, replaced or rewritten). What it
cannot prove exact it refuses with :class:`StackingError`, naming the node, its op and its source line: a silently
different model is the one outcome it must not give. When the graph needs no rewrite, the models' own forward already
acts per channel and the result is model 0 with grouped layers swapped in. :func:`extract_branch` gives back branch k
as a plain model: an instance of the models' own class holding branch k's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import chain

import torch
from torch import Tensor, fx, nn

from groupnet.model_stacking.graph import (
    INFO_KEY,
    StackInfo,
    StackingError,
    _Builder,
    _fetch,
    _record_shapes,
    _trace_both_modes,
)
from groupnet.modules.norm import grouped_norm_of
from groupnet.modules.registry import grouped_class_for, is_grouped_layer

__all__ = ["StackingError", "extract_branch", "is_grouped_layer", "num_branches", "stack_models"]


def _info(model: nn.Module) -> StackInfo | None:
    return getattr(model, "meta", {}).get(INFO_KEY) if isinstance(model, fx.GraphModule) else None


def num_branches(model: nn.Module) -> int:
    """K of a grouped layer or model (every grouped layer inside must agree)."""
    info = _info(model)
    ks = {m.branches for m in model.modules() if is_grouped_layer(m)} | ({info.branches} if info else set())
    if not ks:
        raise ValueError(f"{type(model).__name__} holds no grouped layer")
    if len(ks) > 1:
        raise ValueError(f"{type(model).__name__} mixes grouped layers with different branch counts {sorted(ks)}")
    return ks.pop()


def stack_models(models: Sequence[nn.Module], example_input: Tensor | None = None, *,
                 as_graph: bool = False) -> nn.Module:
    """One grouped model equal to the K given plain models of identical architecture (weights copied).

    The result takes the branch-stacked input ``(N, K*C, ...)`` and returns ``(N, K*out)``. When the traced graph
    shows that the models' own forward acts per channel, it is a copy of model 0 (its own class and forward) with
    grouped layers swapped in; otherwise, or with ``as_graph=True``, a ``torch.fx`` GraphModule with the ops that
    touch channels rewritten per branch, which also reads one view ``(N, C, ...)`` shared by all branches.
    ``example_input`` is one input of one model; without it a probe is built from the first layer
    (``(2, C, 32, 32)`` for a conv, ``(2, F)`` for a linear). Raises :class:`StackingError` for a forward it cannot
    stack exactly, ``ValueError`` when the models differ.
    """
    models = list(models)
    if len(models) == 0:
        raise ValueError("stack_models needs at least one model")
    t = type(models[0])
    for i, m in enumerate(models):
        if type(m) is not t:
            raise TypeError(f"stack_models: at model, model {i} has {type(m).__name__}, model 0 has {t.__name__}")
    grouped = grouped_class_for(t)
    if grouped is not None:
        try:
            return grouped.from_modules(models)
        except (ValueError, TypeError) as e:
            raise type(e)(f"stack_models: at model: {e}") from e
    if t.__module__.startswith("torch.nn.") and any(True for _ in models[0].parameters(recurse=False)):
        raise StackingError(f"stack_models: at model, no grouped counterpart for {t.__name__} with parameters")
    graph = _trace_both_modes(models[0])
    code = graph.python_code("self").src
    for i, m in enumerate(models[1:], start=1):
        if _trace_both_modes(m).python_code("self").src != code:
            raise ValueError(f"stack_models: model {i}'s forward traces to another graph than model 0's; stacking "
                             "needs K models of one architecture")
    _record_shapes(models[0], graph, example_input)
    builder = _Builder(models)
    gm = builder.build(graph)
    if not builder.rewritten and not as_graph:
        return _swap(models)
    gm.meta[INFO_KEY] = StackInfo(
        branches=len(models), skeleton=_meta_skeleton(models[0]), per_branch=frozenset(builder.per_branch),
        moved=dict(builder.moved), unread=_unread(models, builder))
    return gm


def _swap(models: list[nn.Module]) -> nn.Module:
    """A copy of model 0 with every registered layer replaced by the grouped layer of the K models' layers there."""
    out = copy.deepcopy(models[0])
    for path, m in list(out.named_modules()):
        if isinstance(getattr(m, "branches", None), int) and not is_grouped_layer(m):
            m.branches = len(models)
        grouped = grouped_class_for(type(m))
        if grouped is None or not path:
            continue
        try:
            layer = grouped.from_modules([model.get_submodule(path) for model in models])
        except (ValueError, TypeError) as e:
            raise type(e)(f"stack_models: at model.{path}: {e}") from e
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent), name, layer)
    return out


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are data-free meta tensors (no copy of the data)."""
    memo: dict[int, object] = {}
    for t in chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in chain(model.named_parameters(remove_duplicate=False),
                                model.named_buffers(remove_duplicate=False))]


def _covered(name: str, builder: _Builder) -> bool:
    path = name.rpartition(".")[0]
    return (name in builder.per_branch or name in builder.shared_attrs or name in builder.moved
            or path in builder.grouped_paths)


def _unread(models: list[nn.Module], builder: _Builder) -> dict[str, Tensor]:
    """The models' tensors that the forward never reads, kept per branch so that extraction gives them back."""
    return {name: torch.stack([_fetch(m, name).detach().clone() for m in models])
            for name in _tensor_names(models[0]) if not _covered(name, builder)}


def extract_branch(model: nn.Module, k: int) -> nn.Module:
    """A plain copy of branch k of a grouped layer or model, with no grouped layers inside.

    For a model made by :func:`stack_models`, an instance of the stacked models' own class holding branch k's
    tensors. Otherwise grouped layers become their ``branch(k)``; other modules are copied, and an int attribute
    ``branches`` on them (as the models in :mod:`groupnet.models` hold) is set to 1.
    """
    model = _as_grouped(model)
    n = num_branches(model)
    if not isinstance(k, int) or not 0 <= k < n:
        raise IndexError(f"branch index must be in [0, {n}), got {k!r}")
    info = _info(model)
    if info is not None:
        return _extract_stacked(model, info, k)
    if is_grouped_layer(model):
        return model.branch(k)
    out = copy.deepcopy(model)
    _replace_grouped(out, model, k)
    return out


def _extract_stacked(model: fx.GraphModule, info: StackInfo, k: int) -> nn.Module:
    ref = next(chain(model.parameters(), model.buffers()), None)
    out = copy.deepcopy(info.skeleton).to_empty(device=ref.device if ref is not None else "cpu")
    with torch.no_grad():
        for name in _tensor_names(out):
            _fetch(out, name).copy_(_branch_value(model, info, name, k))
    return out.train(model.training)


def _branch_value(model: fx.GraphModule, info: StackInfo, name: str, k: int) -> Tensor:
    if name in info.unread:
        return info.unread[name][k]
    if name in info.per_branch:
        return _fetch(model, name)[k]
    path, _, local = info.moved.get(name, name).rpartition(".")
    owner = model.get_submodule(path)
    owner = _as_grouped(owner)
    if is_grouped_layer(owner):
        return owner.branch_tensors()[k][local]
    return _fetch(model, name)  # shared by every branch


def _as_grouped(m: nn.Module) -> nn.Module:
    """``m``, or the grouped batch norm it was when torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` replaced one
    (same tensors)."""
    grouped = grouped_norm_of(m)
    return m if grouped is None else grouped


def _replace_grouped(target: nn.Module, source: nn.Module, k: int) -> None:
    if isinstance(getattr(target, "branches", None), int):
        target.branches = 1
    for name, child in source.named_children():
        child = _as_grouped(child)
        if is_grouped_layer(child):
            setattr(target, name, child.branch(k))
        else:
            _replace_grouped(getattr(target, name), child, k)
