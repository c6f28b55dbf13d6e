"""The operations a stacked graph calls where a plain model's op touches the channel axis.

A branch-stacked tensor holds K branches' values of a plain ``(N, C, ...)`` tensor as ``(N, K*C, ...)``. Its
*expanded* view ``(N, K, C, ...)`` (:func:`expand`, a view) puts the branch axis beside the plain dims: a plain op
along dim ``d >= 1`` is the same op along ``d + 1`` of the expanded view, for all K branches in one call, and
``flatten(1, 2)`` folds the result back. Each function takes K and runs one such rewrite; they are exact (the same
elementwise arithmetic as the plain op, in the same order).

When a graph that calls them is traced again by torch.fx, each call is recorded as one node (:func:`_leaf`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from groupnet.layout import repeat


def _leaf(fn: Callable) -> Callable:
    """Record ``fn`` as one ``call_function`` node when called on fx proxies (its Python shape logic cannot run on
    them), run it otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        found: list[fx.Proxy] = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
        if found:
            return found[0].tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def expand(x: Tensor, branches: int) -> Tensor:
    """``(N, K*C, ...)`` -> ``(N, K, C, ...)``, a view."""
    return x.unflatten(1, (branches, x.shape[1] // branches))


def fold(y: Any) -> Any:
    """``(N, K, C, ...)`` -> ``(N, K*C, ...)``; tuples (and torch's named result tuples) element by element."""
    if isinstance(y, Tensor):
        return y.flatten(1, 2)
    if isinstance(y, (tuple, list)):
        return type(y)([fold(t) for t in y])  # tuple, list, or torch's named result tuple (values, indices)
    raise TypeError(f"expected a tensor or a tuple of tensors, got {type(y).__name__}")


_NAMESPACES = {"torch": torch, "F": F, "operator": operator}


def resolve(fn: str) -> Callable:
    """``"torch.cat"``, ``"F.softmax"``, ``"operator.add"`` or ``"method.view"`` as a callable."""
    space, _, name = fn.partition(".")
    if space == "method":
        return lambda self, *a, **k: getattr(self, name)(*a, **k)
    return getattr(_NAMESPACES[space], name)


@_leaf
def branch_input(x: Tensor, branches: int, channels: int) -> Tensor:
    """The stacked model's input: K per-branch views ``(N, K*C, ...)`` as they are, or one view ``(N, C, ...)``
    shared by all branches, repeated K times (memory format kept)."""
    if x.dim() >= 2 and x.shape[1] == branches * channels:
        return x
    if x.dim() >= 2 and x.shape[1] == channels:
        return repeat(x, branches)
    raise ValueError(f"the stacked model expects (N, {branches * channels}, ...) (one view per branch) or "
                     f"(N, {channels}, ...) (one view shared by all branches), got shape {tuple(x.shape)}")


@_leaf
def by_mode(training: bool, when_training: Any, when_eval: Any) -> Any:
    """An argument of a plain op that the traced forward set differently in training and eval mode."""
    return when_training if training else when_eval


@_leaf
def plain_call(fn: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` unchanged (a plain module's op that acts within each channel)."""
    return resolve(fn)(*args, **kwargs)


@_leaf
def plain_size(x: Tensor, branches: int, dim: int | None = None) -> Any:
    """``x.size(dim)`` / ``x.shape`` of one branch: the channel count divided by K."""
    shape = list(x.shape)
    shape[1] //= branches
    return torch.Size(shape) if dim is None else shape[dim]


@_leaf
def plain_numel(x: Tensor, branches: int) -> int:
    return x.numel() // branches


@_leaf
def cat_channels(tensors: Sequence[Tensor], branches: int) -> Tensor:
    """``torch.cat(tensors, 1)`` per branch: branch k's channels of each input, in order, then branch k+1's."""
    return torch.cat([expand(t, branches) for t in tensors], 2).flatten(1, 2)


@_leaf
def stack_channels(tensors: Sequence[Tensor], branches: int) -> Tensor:
    """``torch.stack(tensors, 1)`` per branch."""
    return torch.stack([expand(t, branches) for t in tensors], 2).flatten(1, 2)


@_leaf
def along_branch_dims(fn: str, x: Tensor, branches: int, *args: Any, **kwargs: Any) -> Any:
    """``fn(x, *args, **kwargs)`` per branch, where the caller has already moved every dim argument ``d >= 1`` of the
    plain op to ``d + 1`` (the dims of the expanded view)."""
    return fold(resolve(fn)(expand(x, branches), *args, **kwargs))


@_leaf
def reshape_per_sample(x: Tensor, branches: int, shape: Sequence[int]) -> Tensor:
    """``x.reshape(shape)`` per branch, for a plain reshape that keeps dim 0 (each sample's values stay its own)."""
    plain = list(x.shape)
    plain[1] //= branches
    numel = 1
    for s in plain:
        numel *= s
    shape = [int(s) for s in shape]
    if shape.count(-1) == 1:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        shape[shape.index(-1)] = numel // known if known else 0
    if len(shape) < 2 or shape[0] != plain[0]:
        raise RuntimeError(f"stacked model: a reshape of {tuple(plain)} to {tuple(shape)} per branch no longer keeps "
                           "the batch dim; the stacked layout cannot hold it")
    return expand(x, branches).reshape(shape[0], branches, *shape[1:]).flatten(1, 2)


@_leaf
def squeeze_all(x: Tensor, branches: int) -> Tensor:
    """``x.squeeze()`` per branch, the batch dim kept (every other dim of plain size 1 removed)."""
    plain = list(x.shape)
    plain[1] //= branches
    dims = [d + 1 for d in range(1, len(plain)) if plain[d] == 1]
    return expand(x, branches).squeeze(dims).flatten(1, 2) if dims else x


@_leaf
def getitem_per_sample(x: Tensor, branches: int, index: Any) -> Tensor:
    """``x[index]`` per branch, for an index whose first entry is a slice of the batch dim."""
    idx = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx[at : at + 1] = [slice(None)] * (x.dim() - used)
    if not idx or not isinstance(idx[0], slice):
        raise RuntimeError(f"stacked model: index {index!r} does not keep the batch dim as its first entry")
    return expand(x, branches)[(idx[0], slice(None), *idx[1:])].flatten(1, 2)


@_leaf
def channel_shuffle(x: Tensor, branches: int, groups: int) -> Tensor:
    """``F.channel_shuffle(x, groups)`` per branch (the K branches folded into the batch for one call)."""
    n = x.shape[0]
    y = expand(x, branches)
    y = torch.channel_shuffle(y.reshape(n * branches, *y.shape[2:]), groups)
    return y.reshape(n, -1, *y.shape[2:])


@_leaf
def elementwise(fn: str, branches: int, kinds: str, rank: int, *args: Any) -> Tensor:
    """A broadcasting elementwise op whose operands do not line up on the stacked layout, per branch.

    ``kinds`` names each positional argument: ``"B"`` a branch-stacked tensor of plain rank ``rank``, ``"S"`` a tensor
    shared by all branches, ``"P"`` a per-branch tensor stored as ``(K, *plain_shape)``, ``"-"`` anything else. Each
    tensor goes to the expanded layout ``(N, K, ...)`` (shared ones with a size-1 branch dim), then the op broadcasts.
    """
    out = []
    for kind, a in zip(kinds, args):
        if kind == "B":
            a = expand(a, branches)
        elif kind == "S":
            a = a.reshape((1,) * (rank - a.dim()) + tuple(a.shape)).unsqueeze(1)
        elif kind == "P":
            a = a.reshape(a.shape[0], *(1,) * (rank - a.dim() + 1), *a.shape[1:]).movedim(0, 1)
        out.append(a)
    return resolve(fn)(*out).flatten(1, 2)


@_leaf
def branch_to_last(x: Tensor, branches: int) -> Tensor:
    """``(N, K*C, ..., F)`` -> ``(N, C, ..., K*F)``: the branch axis beside the last dim, for a grouped linear or
    layer norm over the last dim of a plain tensor of rank > 2. Rank 2 is returned as it is."""
    if x.dim() == 2:
        return x
    return expand(x, branches).movedim(1, -2).flatten(-2)


@_leaf
def branch_from_last(y: Tensor, branches: int) -> Tensor:
    """The inverse of :func:`branch_to_last`."""
    if y.dim() == 2:
        return y
    return y.unflatten(-1, (branches, y.shape[-1] // branches)).movedim(-2, 1).flatten(1, 2)
