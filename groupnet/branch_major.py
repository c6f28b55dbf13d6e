"""Branch-major execution: run a grouped model one branch at a time, on views of its stacked weights.

The grouped model runs each layer once for all K branches, so every activation it streams is K branches wide. At
large batch those activations outgrow the CPU's last-level cache, and every batch norm, ReLU and add of a training
step then streams from DRAM; a per-branch loop keeps one branch's (K times smaller) working set in cache and wins
(WRN-16-4 at batch 64-128: 4-20% per training step; measured: see ``benchmarks/NOTES.md``). Branch-major execution
gives the grouped model that execution order without a second copy of its weights: a plain one-branch skeleton of the model
(built once, on the meta device, holding no data) is called K times with ``torch.func.functional_call`` on views
of the stacked parameters and running statistics.
Gradients flow back into the stacked parameters (one concatenation per parameter), training-mode batch norms
update the stacked running statistics in place, and the result equals the grouped forward.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from groupnet import _checks
from groupnet.model_stacking import extract_branch, num_branches
from groupnet.modules import BranchwiseLayer, is_grouped_layer


EXECUTION_ORDERS = ("auto", "grouped", "branch")
_FALLBACK_CACHE_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
        except (ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=_FALLBACK_CACHE_BYTES)


def prefer_branch_major(stacked_activation_bytes: int, device: torch.device) -> bool:
    """The ``auto`` execution order: branch-major on the CPU when the widest activation of all K branches together
    takes more than half the last-level cache (measured crossover: 16-24 MiB of stacked activation, 32 MiB L3)."""
    return device.type == "cpu" and stacked_activation_bytes > last_level_cache_bytes() // 2


class _Plan:
    """What branch-major execution of one model needs: its meta skeleton and the module pairs to mirror modes.

    The skeleton is the plain one-branch model (:func:`groupnet.extract_branch`) with each grouped layer's slot
    holding that layer's ``branch_skeleton()`` (:class:`groupnet.modules.BranchwiseLayer`), so a layer whose forward
    differs from its plain counterpart's (the synchronised batch norm) keeps the difference branch by branch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.branches = num_branches(model)
        grouped: dict[str, BranchwiseLayer] = {n: m for n, m in model.named_modules() if is_grouped_layer(m)}
        owned = {f"{n}.{p}" for n, m in grouped.items() for p, _ in m.named_parameters(recurse=False)}
        owned |= {f"{n}.{b}" for n, m in grouped.items() for b, _ in m.named_buffers(recurse=False)}
        stray = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in owned]
        if stray:
            raise ValueError(
                f"branch-major execution needs every parameter and buffer inside a grouped layer; "
                f"{type(model).__name__} also holds {stray[:3]}"
            )
        self.signature = _module_signature(model)  # to notice modules replaced, converted or reconfigured since
        self.grouped = list(grouped.items())
        # Plain modules initialise themselves when built: keep that off the random streams, so a run draws the same
        # numbers whether or not (and whenever) a plan is built.
        cuda = sorted({t.device.index for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            skeleton = extract_branch(model, 0).to("meta")
            for name, layer in self.grouped:
                if name:
                    skeleton.set_submodule(name, layer.branch_skeleton())
                else:
                    skeleton = layer.branch_skeleton()
        self.skeleton = skeleton
        modules = dict(model.named_modules())
        self.pairs = [(s, modules[n]) for n, s in self.skeleton.named_modules()]
        self.counters = [m for _, m in self.grouped if getattr(m, "num_batches_tracked", None) is not None]


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` with forward hooks or pre-hooks, which branch-major execution cannot call
    (it runs a plain skeleton, not these modules)."""
    return [n or type(model).__name__ for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


_CONFIG_TYPES = (int, float, bool, str, tuple, type(None))


def _module_signature(model: nn.Module) -> list[tuple[nn.Module, type, list]]:
    """Each module, its class and its plain settings (drop rates, momenta, ...): the skeleton is a copy of them, so a
    change to any of them (training mode aside, which is mirrored per call) must rebuild it."""
    return [
        (m, type(m), sorted((k, v) for k, v in vars(m).items()
                            if not k.startswith("_") and k != "training" and isinstance(v, _CONFIG_TYPES)))
        for m in model.modules()
    ]


def _plan(model: nn.Module) -> _Plan:
    plan = model.__dict__.get("_groupnet_branch_major")
    if plan is None or plan.signature != _module_signature(model):
        plan = _Plan(model)
        model.__dict__["_groupnet_branch_major"] = plan  # not a submodule: no state_dict entry, no parameters
    return plan


def branch_major_forward(model: nn.Module, x: Tensor, *, shared_input: bool = False) -> Tensor:
    """``model(x)`` computed one branch at a time (see the module docstring).

    Args:
        model: a grouped model whose parameters and buffers all live in grouped layers (the zoo models, or any
            model from :func:`groupnet.stack_models`) and whose forward is channel-stacked on dim 1.
        x: the branch-stacked input ``(N, K*C, ...)``, or with ``shared_input`` one view ``(N, C, ...)`` that every
            branch reads.

    Returns the branch-stacked output ``(N, K*out, ...)``, in x's memory format.
    """
    hooked = hooked_modules(model)
    if hooked:
        raise ValueError(f"branch-major execution would skip the forward hooks on {hooked[:3]}; remove them or run "
                         "the model grouped (execution_order='grouped')")
    plan = _plan(model)
    k = plan.branches
    if x.dim() < 2:
        raise ValueError(f"branch_major_forward expects a branch-stacked (N, K*C, ...) input, got {tuple(x.shape)}")
    if shared_input:
        parts = [x] * k
    else:
        if x.shape[1] % k:
            raise ValueError(f"branch_major_forward: dim 1 of {tuple(x.shape)} is not divisible by {k} branches")
        parts = list(x.chunk(k, 1))
    for skel, mod in plan.pairs:
        skel.training = mod.training
    tensors: list[dict[str, Tensor]] = [{} for _ in range(k)]
    for name, layer in plan.grouped:
        for b, views in enumerate(layer.branch_tensors()):
            tensors[b].update({f"{name}.{n}": t for n, t in views.items()})
    outs = [torch.func.functional_call(plan.skeleton, tensors[b], (parts[b],), strict=True) for b in range(k)]
    for bn in plan.counters:
        if bn.training:
            bn.num_batches_tracked.add_(1)
    out = torch.cat(outs, 1)
    if out.dim() == 4 and x.dim() == 4 and _checks.is_channels_last(x):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
