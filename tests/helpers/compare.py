"""Running a grouped op or layer beside its float64 reference: reference leaves, one shared backward, the per-branch
parameter gradients, and a call counter that shows which implementation ran."""

from __future__ import annotations

from collections.abc import Callable

import torch
from helpers.tolerances import assert_close
from torch import Tensor, nn


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name`` (looked up at call time by groupnet.functional) to count its calls."""
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def float64_leaves(*tensors: Tensor) -> list[Tensor]:
    """Detached float64 copies of ``tensors`` that require grad: the leaves of the reference computation."""
    return [t.detach().double().requires_grad_() for t in tensors]


def backward_with_reference(module: nn.Module, reference: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``module`` on ``x`` and the float64 ``reference`` on a float64 copy of it, and backpropagate one random
    output gradient (drawn in x's dtype from torch's global generator) through both. Returns (y, y_ref, x_ref)."""
    y = module(x)
    grad_y = torch.randn(y.shape, dtype=x.dtype)
    y.backward(grad_y)
    (x_ref,) = float64_leaves(x)
    y_ref = reference(x_ref)
    y_ref.backward(grad_y.double())
    return y, y_ref, x_ref


def assert_branch_param_grads(
    grouped: nn.Module,
    reference: nn.Module,
    join: Callable[[list[Tensor]], Tensor],
    dtype: torch.dtype,
    reduction: int,
    bias: bool,
) -> None:
    """The grouped layer's weight (and bias) gradient against those of the reference's per-branch modules, joined
    along the branch axis by ``join`` (``torch.cat`` for conv rows, ``torch.stack`` for ``(K, out, in)``)."""
    for name in ("weight", "bias") if bias else ("weight",):
        expected = join([getattr(m, name).grad for m in reference.branch_modules])
        assert_close(getattr(grouped, name).grad, expected, dtype, reduction=reduction, what=f"grad {name}")
