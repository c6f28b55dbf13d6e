"""GroupedLinear: K independent linear layers run as one grouped op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from groupnet import _checks
from groupnet.ops import grouped_linear
from groupnet.modules._branch_params import check_branch_index, check_branch_modules, load_branch, unbind_branches
from groupnet.modules._fx import leaf_call
from groupnet.modules.branchwise import BranchSkeletonMixin


class GroupedLinear(BranchSkeletonMixin, nn.Module):
    """K independent ``nn.Linear`` layers on branch-stacked features ``(..., K*in_features)``.

    Sizes are per branch. ``weight`` is ``(K, out_features, in_features)``, ``bias`` is ``(K, out_features)``.
    Each branch is initialised exactly as ``nn.Linear`` initialises itself. Used for classifier heads too: the
    output ``(N, K*num_classes)`` holds every branch's logits.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        branches: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _checks.check_positive(in_features=in_features, out_features=out_features, branches=branches)
        self.in_features, self.out_features, self.branches = in_features, out_features, branches
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(branches, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(branches, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each branch as ``nn.Linear.reset_parameters`` would, branch after branch."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            for k in range(self.branches):
                nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
                if self.bias is not None:
                    nn.init.uniform_(self.bias[k], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        traced = leaf_call(self, x)
        if traced is not None:
            return traced
        return grouped_linear(x, self.weight, self.bias)

    def _traced_root(self, x: Tensor) -> Tensor:
        # (..., K, 1, in) @ (K, in, out): broadcasting matmul, no shape arithmetic on the proxy
        y = torch.matmul(x.unflatten(-1, (self.branches, self.in_features)).unsqueeze(-2),
                         self.weight.transpose(1, 2)).squeeze(-2)
        if self.bias is not None:
            y = y + self.bias
        return y.flatten(-2)

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """The K branches' parameters as views (autograd flows back to the stacked ones), named as in ``branch(k)``."""
        names = ["weight"] + ([] if self.bias is None else ["bias"])
        return unbind_branches({n: getattr(self, n) for n in names}, self.branches)

    def branch(self, k: int) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of branch k's weights."""
        check_branch_index(k, self.branches)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        return load_branch(lin, self.branch_tensors()[k])

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Linear]) -> GroupedLinear:
        """Stack K ``nn.Linear`` of one configuration into a grouped linear (weights copied)."""
        def config(m: nn.Linear) -> tuple:
            return (m.in_features, m.out_features, m.bias is not None, m.weight.dtype)

        check_branch_modules(modules, nn.Linear, config)
        m0 = modules[0]
        out = cls(m0.in_features, m0.out_features, branches=len(modules), bias=m0.bias is not None,
                  device=m0.weight.device, dtype=m0.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.stack([m.weight for m in modules]))
            if out.bias is not None:
                out.bias.copy_(torch.stack([m.bias for m in modules]))
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, branches={self.branches}, "
                f"bias={self.bias is not None}")
