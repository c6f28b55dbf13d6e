"""What a grouped layer provides so that a model can run branch by branch (:mod:`groupnet.branch_major`).

Branch-major execution never calls a grouped layer. It builds a plain one-branch skeleton of the model once (on the
meta device, holding no data) and calls it K times with ``torch.func.functional_call``, each time on one branch's
views of the stacked tensors. A grouped layer therefore has to provide, besides ``branches``:

- ``branch_tensors()``: the K branches' parameters and buffers as views of the stacked tensors, named as the plain
  module names them. Gradients must flow back to the stacked parameters and in-place buffer updates (running
  statistics) must land in the stacked buffers; ``branch_major`` counts ``num_batches_tracked`` once itself.
- ``branch(k)``: a plain torch module holding a copy of branch k (this is what
  :func:`groupnet.extract_branch` returns, and what the skeleton around the layer is built from).
- ``branch_skeleton()``: the data-free plain module that computes one branch from one entry of
  ``branch_tensors()``. For a layer whose forward is its plain counterpart's this is ``branch(0)`` on the meta
  device (:class:`BranchSkeletonMixin`); a layer whose forward differs from its plain counterpart's returns a plain
  module with the same difference, as the synchronised batch norm does
  (:class:`groupnet.modules.sync_batchnorm.SyncBatchNorm2d`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class BranchwiseLayer(Protocol):
    """A grouped layer that :func:`groupnet.branch_major_forward` can run branch by branch (see the module docstring).

    Every layer of :mod:`groupnet.modules.registry` satisfies it.
    """

    branches: int

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """The K branches' parameters and buffers as views, named as in ``branch(k)``."""
        ...

    def branch(self, k: int) -> nn.Module:
        """A plain torch module holding a copy of branch k."""
        ...

    def branch_skeleton(self) -> nn.Module:
        """A plain module on the meta device that computes one branch from one entry of ``branch_tensors()``."""
        ...


class BranchSkeletonMixin:
    """``branch_skeleton()`` for a grouped layer whose branches compute exactly what ``branch(k)`` computes."""

    def branch_skeleton(self) -> nn.Module:
        """``branch(0)`` moved to the meta device: the plain module's forward, with no data of its own."""
        return self.branch(0).to("meta")  # type: ignore[attr-defined]
