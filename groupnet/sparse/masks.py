"""Per-branch masks of a grouped model's conv and linear weights, applied to the weights and the optimizer state.

:class:`Masking` finds every weight of a grouped conv or linear layer (and of a plain ``nn.Conv2d`` / ``nn.Linear``,
as one branch), never biases and never norm layers, and keeps beside each a boolean mask of the weight's own shape:
``True`` = active. Branch k of a stacked weight is its k-th block along dim 0 (``GroupedConv2d``: rows
``[k*out, (k+1)*out)``; ``GroupedLinear``: ``weight[k]``), so ``mask.reshape(K, -1)[k]`` is branch k's mask.

The masks live in the Masking object (and in its :meth:`~Masking.state_dict`), not in the model: the model's
state dict is unchanged, and the masked weights simply hold zeros (an extracted or exported branch carries them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from groupnet.modules.registry import grouped_types
from groupnet.sparse.init import SPARSE_INITS, active_count, check_density, layer_densities, random_mask

__all__ = ["MaskedWeight", "Masking", "maskable_weights"]

_CONV = (*grouped_types("conv"), nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR = (*grouped_types("linear"), nn.Linear)


@dataclass(frozen=True)
class MaskedWeight:
    """One masked weight: its parameter name in the model, K, and the shape of ONE branch's weight."""

    name: str
    branches: int
    branch_shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Weights per branch."""
        return math.prod(self.branch_shape)


def maskable_weights(model: nn.Module) -> list[MaskedWeight]:
    """The conv and linear weights of ``model`` in module order (by module type: biases and norms never)."""
    out = []
    for path, module in model.named_modules():
        if not isinstance(module, _CONV + _LINEAR) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        w = module.weight
        k = int(getattr(module, "branches", 1)) if isinstance(module, grouped_types()) else 1
        if w.shape[0] % k:
            raise ValueError(f"{path}: weight {tuple(w.shape)} does not split into {k} branches along dim 0")
        if isinstance(module, grouped_types("linear")):
            shape = tuple(w.shape[1:])  # (K, out, in)
        else:
            shape = (w.shape[0] // k, *w.shape[1:])  # (K*out, in/groups, kh, kw)
        out.append(MaskedWeight(f"{path}.weight" if path else "weight", k, tuple(int(s) for s in shape)))
    return out


class Masking:
    """Per-branch sparse masks for a model's conv and linear weights.

    Args:
        model: a grouped model (or a plain one, as K=1). Its parameters are masked in place by :meth:`apply`.
        density: the overall fraction of maskable weights kept active, in (0, 1] (sparsity = 1 - density).
        init: ``"erk"`` or ``"uniform"`` per-layer densities, computed from one branch's shape
            (:mod:`groupnet.sparse.init`), the same for every branch.
        dense_layers: parameter names kept fully dense; ``dense_first_last`` adds the first and the last.
        seed: seeds the masks' generator (every process of a DDP run passes the same seed and gets the same masks).
        optimizer: its state (SGD momentum, Adam moments: every state tensor of a weight's shape) is masked too.

    Each branch draws its own random positions (exactly ``round(density_l * n_l)`` per branch and layer).
    Nothing is applied at construction: call :meth:`apply` to zero the inactive weights.
    """

    def __init__(self, model: nn.Module, density: float, *, init: str = "erk",
                 dense_layers: Collection[str] = (), dense_first_last: bool = False, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.target_density = check_density(density)
        if init not in SPARSE_INITS:
            raise ValueError(f"sparse init must be one of {SPARSE_INITS}, got {init!r}")
        self.init = init
        self.model, self.optimizer = model, optimizer
        self.layers = maskable_weights(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no conv or linear weights to mask")
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {w.name: params[w.name] for w in self.layers}
        dense = set(dense_layers)
        if dense_first_last:
            dense |= {self.layers[0].name, self.layers[-1].name}
        self.dense_layers = frozenset(dense)
        shapes = {w.name: w.branch_shape for w in self.layers}
        self.layer_density: dict[str, float] = layer_densities(init, shapes, self.target_density, dense)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.masks: dict[str, Tensor] = {}
        for w in self.layers:
            n = active_count(self.layer_density[w.name], w.numel)
            flat = torch.stack([random_mask(w.numel, n, self.generator) for _ in range(w.branches)])
            p = self.params[w.name]
            self.masks[w.name] = flat.reshape(p.shape).to(p.device)
        #: Running OR of every mask since initialisation (the positions that have ever been active).
        self.fired: dict[str, Tensor] = {n: m.clone() for n, m in self.masks.items()}

    # ----------------------------------------------------------------------------------------------- reading
    def layer(self, name: str) -> MaskedWeight:
        for w in self.layers:
            if w.name == name:
                return w
        raise KeyError(f"{name!r} is not a masked weight; masked: {[w.name for w in self.layers]}")

    def branch_view(self, name: str, t: Tensor) -> Tensor:
        """``t`` (a weight-shaped tensor) as ``(K, numel per branch)`` (a copy when ``t`` is not contiguous)."""
        return t.reshape(self.layer(name).branches, -1)

    def expected_active(self, name: str) -> int:
        """Active weights each branch of layer ``name`` must hold."""
        w = self.layer(name)
        return active_count(self.layer_density[name], w.numel)

    def active_counts(self, name: str) -> Tensor:
        """Active weights of each branch of layer ``name``, shape ``(K,)``."""
        return self.branch_view(name, self.masks[name]).sum(1)

    def check_counts(self) -> None:
        """Raise RuntimeError unless every (branch, layer) holds exactly its expected number of active weights."""
        for w in self.layers:
            want = self.expected_active(w.name)
            got = self.active_counts(w.name)
            if not bool((got == want).all()):
                raise RuntimeError(f"{w.name}: active weights per branch {got.tolist()}, expected {want} each")

    def density_of(self, name: str) -> float:
        """Active fraction of layer ``name`` (all branches)."""
        return float(self.masks[name].float().mean())

    def density(self, branch: int | None = None) -> float:
        """Active fraction of all masked weights (of one branch when given)."""
        active = total = 0
        for w in self.layers:
            m = self.branch_view(w.name, self.masks[w.name])
            active += int(m.sum()) if branch is None else int(m[branch].sum())
            total += m.numel() if branch is None else w.numel
        return active / total

    def sparsity(self, branch: int | None = None) -> float:
        """1 - :meth:`density`."""
        return 1.0 - self.density(branch)

    @property
    def branches(self) -> int:
        return self.layers[0].branches

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.masks.items())

    # ----------------------------------------------------------------------------------------------- applying
    @torch.no_grad()
    def apply(self) -> None:
        """Zero every inactive weight and, when an optimizer is attached, its state (momentum, moments)."""
        for name, mask in self.masks.items():
            p = self.params[name]
            p.mul_(mask)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.mul_(mask)

    @torch.no_grad()
    def zero_state_at(self, name: str, positions: Tensor) -> None:
        """Zero the weight ``name`` and its optimizer state at the boolean ``positions`` (regrown weights start at 0)."""
        p = self.params[name]
        p.masked_fill_(positions, 0)
        if self.optimizer is not None:
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(positions, 0)

    # ----------------------------------------------------------------------------------------------- state
    def fingerprint(self) -> int:
        """A number that differs, with high probability, between two different sets of masks (DDP agreement checks)."""
        total = 0
        for i, (name, mask) in enumerate(self.masks.items()):
            idx = mask.reshape(-1).nonzero().squeeze(1).to(torch.int64).cpu()
            total = (total + (i + 1) * int(((idx * 2654435761 + 97) % 2147483647).sum())) % (1 << 62)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {
            "density": self.target_density, "init": self.init, "dense_layers": sorted(self.dense_layers),
            "layer_density": dict(self.layer_density),
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "fired": {n: m.detach().cpu().clone() for n, m in self.fired.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks, fired masks and the generator; the layers and their shapes must match."""
        if set(state["masks"]) != set(self.masks):
            raise ValueError(f"saved masks are for layers {sorted(state['masks'])}, this model masks "
                             f"{sorted(self.masks)}")
        for name in self.masks:
            saved = state["masks"][name]
            if saved.shape != self.masks[name].shape:
                raise ValueError(f"saved mask of {name} has shape {tuple(saved.shape)}, the weight "
                                 f"{tuple(self.masks[name].shape)}")
        if (float(state["density"]), state["init"], sorted(state["dense_layers"])) != \
                (self.target_density, self.init, sorted(self.dense_layers)):
            raise ValueError(f"saved masks were made with density {state['density']}, init {state['init']!r}, dense "
                             f"layers {state['dense_layers']}; this run asks for {self.target_density}, "
                             f"{self.init!r}, {sorted(self.dense_layers)}")
        device = {n: m.device for n, m in self.masks.items()}
        self.layer_density = {n: float(v) for n, v in state["layer_density"].items()}
        self.masks = {n: state["masks"][n].to(device[n], torch.bool, copy=True) for n in self.masks}
        self.fired = {n: state["fired"][n].to(device[n], torch.bool, copy=True) for n in self.masks}
        self.generator.set_state(state["generator"])
