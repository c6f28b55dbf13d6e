"""The one table of kernel-test tolerances, by the dtype the kernel computes in.

Results are compared with float64 references computed from the same (already rounded) inputs, so the error is
fp32 accumulation plus the final rounding to the output dtype. ``rtol`` covers the output rounding (a few ulps of
the dtype); ``atol`` grows with the reduction length (FlagGems' ``atol * reduce_dim``) for accumulation error and
near-zero results of cancelling sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    atol: float  # per element of the reduction
    rtol: float


TOLERANCES = {
    torch.float64: Tolerance(atol=1e-13, rtol=1e-11),
    torch.float32: Tolerance(atol=1e-6, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-4, rtol=2e-3),  # fp16 ulp = 2**-10
    torch.bfloat16: Tolerance(atol=1e-3, rtol=1.6e-2),  # bf16 ulp = 2**-7
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, reduction: int = 1, what: str = "") -> None:
    """``actual`` (any dtype) against a float64 ``expected`` with the tolerance of ``dtype``."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        atol=tol.atol * max(1, reduction),
        rtol=tol.rtol,
        msg=lambda m: f"{what} ({dtype}, reduction {reduction}): {m}",
    )
