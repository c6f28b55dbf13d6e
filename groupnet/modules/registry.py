"""The one list of grouped layer types, and what the rest of groupnet reads from it.

Each :class:`GroupedLayerType` says which plain torch layer a grouped layer replaces and what kind of layer it is.
The readers:

- model stacking (:mod:`groupnet.model_stacking`): which grouped class stacks K plain modules of a type
  (:func:`grouped_class_for`), and which modules are grouped layers (:func:`is_grouped_layer`);
- inference fusion (:mod:`groupnet.fuse`): the grouped layers are fx leaves, the grouped conv of ``nn.Conv2d``
  takes a folded batch norm;
- complexity (:mod:`groupnet.complexity`): layers of kind ``"conv"`` and ``"linear"`` count flops and acts;
- the optimizer's parameter groups (:mod:`groupnet.training.optim`): layers of kind ``"norm"`` get no weight decay;
- branch-major execution (:mod:`groupnet.branch_major`): grouped layers hold every parameter and run branch by branch
  (:class:`groupnet.modules.branchwise.BranchwiseLayer`).

Adding a grouped layer is one module file in ``groupnet/modules/`` plus one line in :data:`GROUPED_LAYERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from groupnet.modules.conv import GroupedConv2d
from groupnet.modules.linear import GroupedLinear
from groupnet.modules.norm import GroupedBatchNorm1d, GroupedBatchNorm2d, GroupedLayerNorm

KINDS = ("conv", "linear", "norm")
_REQUIRED = ("from_modules", "branch", "branch_tensors", "branch_skeleton")


@dataclass(frozen=True)
class GroupedLayerType:
    """One grouped layer type: ``grouped`` equals K independent ``plain`` modules.

    ``kind`` decides how the readers treat it: ``"conv"`` and ``"linear"`` count flops and acts and their weights get
    weight decay; ``"norm"`` parameters get none. ``grouped`` must provide ``from_modules`` (stacking) and
    the :class:`~groupnet.modules.branchwise.BranchwiseLayer` methods (extraction and branch-major execution).
    """

    grouped: type[nn.Module]
    plain: type[nn.Module]
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.grouped.__name__}: kind must be one of {KINDS}, got {self.kind!r}")
        missing = [name for name in _REQUIRED if not callable(getattr(self.grouped, name, None))]
        if missing:
            raise TypeError(f"{self.grouped.__name__} lacks {missing}, which every grouped layer provides")


GROUPED_LAYERS: tuple[GroupedLayerType, ...] = (
    GroupedLayerType(GroupedConv2d, nn.Conv2d, "conv"),
    GroupedLayerType(GroupedLinear, nn.Linear, "linear"),
    GroupedLayerType(GroupedBatchNorm2d, nn.BatchNorm2d, "norm"),
    GroupedLayerType(GroupedBatchNorm1d, nn.BatchNorm1d, "norm"),
    GroupedLayerType(GroupedLayerNorm, nn.LayerNorm, "norm"),
)

_BY_PLAIN = {entry.plain: entry.grouped for entry in GROUPED_LAYERS}
if len(_BY_PLAIN) != len(GROUPED_LAYERS):
    raise TypeError("two grouped layers replace the same plain type: stacking could not choose between them")
_ALL = tuple(e.grouped for e in GROUPED_LAYERS)


def grouped_types(kind: str | None = None) -> tuple[type[nn.Module], ...]:
    """The grouped layer classes (of one ``kind`` when given), for ``isinstance`` checks."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(e.grouped for e in GROUPED_LAYERS if kind is None or e.kind == kind)


def norm_types() -> tuple[type[nn.Module], ...]:
    """The grouped normalisation layer classes (their parameters get no weight decay)."""
    return grouped_types("norm")


def is_grouped_layer(m: nn.Module) -> bool:
    """True for an instance of a registered grouped layer (or of a subclass, such as a synchronised batch norm)."""
    return isinstance(m, _ALL)


def grouped_class_for(plain_type: type) -> type[nn.Module] | None:
    """The grouped class that stacks K modules of exactly ``plain_type``, or None (subclasses are not matched: a
    subclass may change the forward the grouped layer would have to reproduce)."""
    return _BY_PLAIN.get(plain_type)
