"""Helpers for building a grouped module from K plain modules and taking one back out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn


def check_branch_modules(modules: Sequence[nn.Module], cls: type, config: Callable[[Any], tuple]) -> None:
    """All K modules must be instances of ``cls`` with the same configuration (same shapes, same hyper-parameters)."""
    if len(modules) == 0:
        raise ValueError(f"from_modules needs at least one {cls.__name__}, got an empty list")
    for k, m in enumerate(modules):
        if type(m) is not cls:
            raise TypeError(f"from_modules expects {cls.__name__} modules, module {k} is {type(m).__name__}")
    ref = config(modules[0])
    for k, m in enumerate(modules[1:], start=1):
        if config(m) != ref:
            raise ValueError(
                f"from_modules: module {k} is configured as {config(m)}, module 0 as {ref}; all branches must match"
            )
    dev = {p.device for m in modules for p in m.parameters()} | {b.device for m in modules for b in m.buffers()}
    if len(dev) > 1:
        raise RuntimeError(f"from_modules: the modules live on several devices {sorted(map(str, dev))}")


def check_branch_index(k: int, branches: int) -> None:
    if not isinstance(k, int) or not 0 <= k < branches:
        raise IndexError(f"branch index must be in [0, {branches}), got {k!r}")


def load_branch(plain: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """Copy one branch's tensors (an entry of a grouped layer's ``branch_tensors()``) into its plain module."""
    plain.load_state_dict(tensors, strict=True)
    return plain


def split_rows(tensors: dict[str, Tensor], branches: int) -> list[dict[str, Tensor]]:
    """K dicts of views: each tensor's dim 0 cut into K equal blocks (channel-stacked weights and statistics).

    One ``chunk`` per tensor, so the backward adds the K branches' gradients with one concatenation.
    """
    parts = {n: t.chunk(branches, 0) for n, t in tensors.items()}
    return [{n: p[k] for n, p in parts.items()} for k in range(branches)]


def unbind_branches(tensors: dict[str, Tensor], branches: int) -> list[dict[str, Tensor]]:
    """K dicts of views: each ``(K, ...)`` tensor unbound along dim 0."""
    parts = {n: t.unbind(0) for n, t in tensors.items()}
    return [{n: p[k] for n, p in parts.items()} for k in range(branches)]
