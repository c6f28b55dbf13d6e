"""Out-of-bounds detection for kernels run by the Triton interpreter, which does not catch stray accesses.

Inputs are placed inside larger NaN-filled buffers (a read outside the tensor pulls a NaN into the result) and
outputs inside sentinel-filled buffers (a write outside the tensor overwrites a sentinel). Padding every dimension
also gives the views non-trivial strides: a ``(M, K*F)`` activation becomes a column slice of a wider tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

SENTINEL = 1536.0  # exactly representable in fp16, bf16, fp32 and fp64


class Embedded:
    """A view of the interior of a larger filled buffer."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float, pad: int = 2, transpose: bool = False):
        self.fill = fill
        buffer_shape = [s + 2 * pad for s in shape]
        if transpose:  # the view is the transpose of a slice: dim 0 becomes the fastest-moving one
            buffer_shape = buffer_shape[::-1]
        self.buffer = torch.full(buffer_shape, fill, dtype=dtype)
        interior = tuple(slice(pad, pad + s) for s in (shape[::-1] if transpose else shape))
        self.inside = torch.zeros(buffer_shape, dtype=torch.bool)
        self.inside[interior] = True
        view = self.buffer[interior]
        self.view = view.permute(*reversed(range(view.dim()))) if transpose else view
        assert tuple(self.view.shape) == tuple(shape)

    def outside_untouched(self) -> bool:
        """True when every element outside the view still holds the fill value (NaN compares as NaN)."""
        outside = self.buffer[~self.inside]
        if self.fill != self.fill:
            return bool(torch.isnan(outside).all())
        return bool((outside == torch.tensor(self.fill, dtype=self.buffer.dtype)).all())


def nan_embedded(t: Tensor, pad: int = 2, transpose: bool = False) -> Tensor:
    """A copy of ``t`` living inside a NaN-filled buffer (so with padded, non-contiguous strides)."""
    e = Embedded(tuple(t.shape), t.dtype, float("nan"), pad=pad, transpose=transpose)
    e.view.copy_(t)
    return e.view


def sentinel_output(shape: tuple[int, ...], dtype: torch.dtype, pad: int = 2, transpose: bool = False) -> Embedded:
    """An output view inside a sentinel-filled buffer; the view itself starts as the sentinel too."""
    return Embedded(shape, dtype, SENTINEL, pad=pad, transpose=transpose)


def assert_no_oob(out: Embedded, what: str) -> None:
    """The kernel wrote every element of the view (no sentinel left, no NaN read in) and nothing outside it."""
    assert out.outside_untouched(), f"{what}: a write landed outside the output tensor"
    assert not torch.isnan(out.view).any(), f"{what}: NaN in the output (an out-of-bounds read of the NaN padding)"
    assert not (out.view == torch.tensor(SENTINEL, dtype=out.view.dtype)).any(), (
        f"{what}: an output element was never written (still the sentinel)"
    )
