"""The one table of test tolerances, keyed by (kind of comparison, dtype), and the one ``assert_close``.

Every entry compares a result with a reference of it; the kinds differ in what the reference is and so in what
error is left over, which is why they differ:

- ``"kernel"``: a Triton kernel's pass against float64 torch computed from the same (already rounded) inputs, keyed
  by the dtype the kernel computes in. The error is fp32 accumulation plus the final rounding to the output dtype.
  ``rtol`` covers the output rounding (a few ulps of the dtype); ``atol`` is per element of the reduction (the
  caller passes the reduction length: FlagGems' ``atol * reduce_dim``) for accumulation error and near-zero
  results of cancelling sums.
- ``"reference"``: a float64 grouped layer, stacked model or co-training loss against its naive per-branch float64
  reference (K plain modules in a loop). Only the summation order differs.
- ``"fused"``: ``fuse_for_inference`` against the eval-mode model it was built from, keyed by the model's dtype.
  The error is relative to the largest ``|expected|`` (``atol`` times ``max|expected| + 1e-12``, no ``rtol``):
  folding a batch norm rescales the conv weights, so every output moves by rounding relative to the output's
  scale. float32 runs oneDNN's fused conv, whose summation order differs from the unfused conv's.
- ``"cotrain_loss"``, ``"cotrain_grad"``: the fused co-training loss kernel's per-sample loss, cross-entropies and
  divergence, and its logits gradient, against the reference on the same (rounded) logits, keyed by the logits
  dtype. ``atol`` is scaled by ``1 + max|expected|``. 16-bit logits are computed in fp32, so the loss keeps fp32
  accuracy; the gradient is cast back to the logits dtype, so its ``rtol`` is about one ulp of that dtype
  (fp16: 2**-10, bf16: 2**-7).
- ``"autocast"``, ``"autocast_model"``: a float32 layer (or zoo model) run under ``torch.autocast`` against the
  float64 run of the same weights and input, keyed by autocast's dtype. Every operand is rounded to that dtype
  before each conv/linear and each output once after it, so the error is a few ulps relative to the largest value
  (``atol`` scaled by ``max|expected|``); a model stacks such roundings over its depth (and a training-mode batch
  norm divides by a rounded standard deviation), hence its looser entry.
- ``"autocast_model"``, ``"autocast_model_grad"`` are used by ``assert_close_in_norm``: a zoo model's logits and
  gradients under autocast against float64, as ``||actual - expected|| <= atol * ||expected||``. Gradients of a
  whole network in bf16 differ from float64 by 5-40% in norm for plain torch models as much as for grouped ones
  (measured on the tiny zoo models), so that entry only catches missing or misrouted gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    atol: float  # before scaling by `atol_scale`
    rtol: float
    # What atol is multiplied by: "reduction" (the caller's reduction length, 1 by default), "peak" (max|expected|
    # + 1e-12: an error relative to the largest expected value), "1+peak" (1 + max|expected|) or "norm" (the
    # whole tensor's error norm against ||expected||, by assert_close_in_norm only).
    atol_scale: str = "reduction"


TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("kernel", torch.float64): Tolerance(atol=1e-13, rtol=1e-11),
    ("kernel", torch.float32): Tolerance(atol=1e-6, rtol=1e-5),
    ("kernel", torch.float16): Tolerance(atol=1e-4, rtol=2e-3),  # fp16 ulp = 2**-10
    ("kernel", torch.bfloat16): Tolerance(atol=1e-3, rtol=1.6e-2),  # bf16 ulp = 2**-7
    ("reference", torch.float64): Tolerance(atol=1e-10, rtol=1e-9),
    ("fused", torch.float64): Tolerance(atol=1e-10, rtol=0.0, atol_scale="peak"),
    ("fused", torch.float32): Tolerance(atol=1e-4, rtol=0.0, atol_scale="peak"),
    ("cotrain_loss", torch.float64): Tolerance(atol=1e-10, rtol=1e-10, atol_scale="1+peak"),
    ("cotrain_loss", torch.float32): Tolerance(atol=1e-5, rtol=1e-5, atol_scale="1+peak"),
    ("cotrain_loss", torch.float16): Tolerance(atol=1e-5, rtol=1e-5, atol_scale="1+peak"),
    ("cotrain_loss", torch.bfloat16): Tolerance(atol=1e-5, rtol=1e-5, atol_scale="1+peak"),
    ("cotrain_grad", torch.float64): Tolerance(atol=1e-12, rtol=1e-10, atol_scale="1+peak"),
    ("cotrain_grad", torch.float32): Tolerance(atol=1e-6, rtol=1e-4, atol_scale="1+peak"),
    ("cotrain_grad", torch.float16): Tolerance(atol=1e-5, rtol=1e-3, atol_scale="1+peak"),
    ("cotrain_grad", torch.bfloat16): Tolerance(atol=1e-5, rtol=8e-3, atol_scale="1+peak"),
    ("autocast", torch.bfloat16): Tolerance(atol=2e-2, rtol=2e-2, atol_scale="peak"),
    ("autocast_model", torch.bfloat16): Tolerance(atol=5e-2, rtol=0.0, atol_scale="norm"),
    ("autocast_model_grad", torch.bfloat16): Tolerance(atol=0.75, rtol=0.0, atol_scale="norm"),
}


def _atol(tol: Tolerance, expected: Tensor, reduction: int) -> float:
    if tol.atol_scale == "reduction":
        return tol.atol * max(1, reduction)
    assert reduction == 1, f"reduction applies to atol_scale='reduction' entries only, not {tol.atol_scale!r}"
    if tol.atol_scale == "peak":
        return tol.atol * (expected.abs().max().item() + 1e-12)
    assert tol.atol_scale == "1+peak", tol.atol_scale
    return tol.atol * (1.0 + expected.abs().max().item() if expected.numel() else 1.0)


def assert_close(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype | None = None,
    *,
    kind: str = "kernel",
    reduction: int = 1,
    what: str = "",
) -> None:
    """``actual`` against ``expected`` with the tolerance ``TOLERANCES[kind, dtype]``.

    ``dtype`` given: ``actual`` (any dtype) is a result computed in ``dtype`` and ``expected`` a float64 reference
    of it; both are compared in float64. ``dtype`` None: both are compared as they are, so they must have the same
    dtype (torch.testing's check), and the entry is the one of that dtype. ``reduction``: the length of the sum
    behind each element, for ``"kernel"`` entries.
    """
    if dtype is None:
        tol = TOLERANCES[kind, actual.dtype]
        label = f"{what} ({kind}, {actual.dtype})"
    else:
        tol = TOLERANCES[kind, dtype]
        label = f"{what} ({kind}, {dtype}, reduction {reduction})"
        actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(
        actual,
        expected,
        atol=_atol(tol, expected, reduction),
        rtol=tol.rtol,
        msg=lambda m: f"{label}: {m}",
    )


def assert_close_in_norm(actual: Tensor, expected: Tensor, dtype: torch.dtype, *, kind: str, what: str = "") -> None:
    """``||actual - expected|| <= atol * ||expected||`` (float64 norms) with the ``"norm"`` entry ``TOLERANCES[kind,
    dtype]``: for results whose elementwise error is dominated by a few cancelling elements (whole networks)."""
    tol = TOLERANCES[kind, dtype]
    assert tol.atol_scale == "norm", f"{kind} is not a norm tolerance"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= tol.atol * scale + 1e-30, (
        f"{what} ({kind}, {dtype}): error norm {error:.3g} > {tol.atol} * ||expected|| = {tol.atol * scale:.3g}"
    )
