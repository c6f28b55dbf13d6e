"""The ways to run a split network that groupnet is compared with, each built from the same groupnet model.

A peer turns (groupnet model, per-branch views) into a :class:`Prepared`: the module to put in train/eval mode, a
forward function, the parameters to optimise, its input, and its loss. :func:`make_runner` then returns the zero-
argument function that pytest-benchmark times: one training step (forward, loss, backward, optimizer step) or one
inference forward.

Peers:

- ``groupnet``: the grouped model as groupnet runs it on CPU (channels_last; inference through
  :func:`groupnet.fuse.fuse_for_inference`).
- ``loop-nchw`` / ``loop-cl``: K plain models (``groupnet.extract_branch``) in a Python loop (``groupnet.PerBranch``,
  how the SplitNet reference code runs), NCHW or channels_last.
- ``vmap``: PyTorch's model-ensembling recipe, ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``.
- ``torch-grouped``: the same network with torch's own layers: ``nn.Conv2d(K*Cin, K*Cout, groups=K)``,
  ``nn.BatchNorm2d(K*C)`` and a grouped ``nn.Conv1d`` head (Packed-Ensembles built from plain torch).
- ``packed-tu``: torch-uncertainty's ``PackedConv2d`` / ``PackedLinear`` (alpha=K, num_estimators=K, gamma=1);
  skipped where torch-uncertainty is not importable (it needs torchvision, see CONTRIBUTING).
- ``compile-loop``: ``torch.compile`` of ``loop-cl``; ``groupnet-compile``: ``torch.compile`` of the groupnet model.
- ``dense``: the unsplit network (K=1) of about the same parameter count, plain cross-entropy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import groupnet as gn
from groupnet.cotraining import CoTrainingLoss
from groupnet.fuse import fuse_for_inference
from groupnet.models import build_model

from cases import LR, MOMENTUM, NUM_CLASSES, WEIGHT_DECAY, ModelCase, model_data

CL = torch.channels_last


@dataclass
class Prepared:
    module: nn.Module  # what train()/eval() is called on
    forward: Callable[[Tensor], Tensor]
    params: list[nn.Parameter]
    input: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    reference: nn.Module | None  # an uncompiled module computing the same function, checked against groupnet


def cotraining_loss(branches: int) -> Callable[[Tensor, Tensor], Tensor]:
    loss = CoTrainingLoss(branches)
    return lambda logits, y: loss(logits, y).loss


def plain(module: nn.Module, x: Tensor, branches: int) -> Prepared:
    return Prepared(module, module, list(module.parameters()), x, cotraining_loss(branches), module)


def prepare_groupnet(model: nn.Module, views: Tensor, mode: str) -> Prepared:
    model = model.to(memory_format=CL)
    prepared = plain(model, views.contiguous(memory_format=CL), model.branches)
    if mode == "infer":
        fused = fuse_for_inference(model)
        prepared.module, prepared.forward, prepared.reference = fused, fused, fused
    return prepared


def branches_of(model: nn.Module) -> list[nn.Module]:
    return [gn.extract_branch(model, k) for k in range(model.branches)]


def prepare_loop(model: nn.Module, views: Tensor, channels_last: bool) -> Prepared:
    loop = gn.PerBranch(branches_of(model))
    x = views
    if channels_last:
        loop, x = loop.to(memory_format=CL), views.contiguous(memory_format=CL)
    return plain(loop, x, model.branches)


class VmapEnsemble(nn.Module):
    """K branch models as stacked parameters, run with ``vmap(functional_call)`` on ``(K, N, C, H, W)``."""

    def __init__(self, branch_models: list[nn.Module]) -> None:
        super().__init__()
        params, buffers = torch.func.stack_module_state(branch_models)
        self.names = list(params)
        self.params = nn.ParameterList(params.values())
        self.buffer_names = list(buffers)
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f"buffer{i}", b)
        self.base = [copy.deepcopy(branch_models[0]).to("meta")]  # a list: not a submodule, no state of its own

    def train(self, mode: bool = True) -> VmapEnsemble:
        super().train(mode)
        self.base[0].train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        params = dict(zip(self.names, self.params))
        buffers = {n: getattr(self, f"buffer{i}") for i, n in enumerate(self.buffer_names)}
        base = self.base[0]

        def one(p: dict, b: dict, xk: Tensor) -> Tensor:
            return torch.func.functional_call(base, (p, b), (xk,))

        return torch.func.vmap(one)(params, buffers, x)  # (K, N, classes): CoTrainingLoss takes it as is


def prepare_vmap(model: nn.Module, views: Tensor) -> Prepared:
    ens = VmapEnsemble(branches_of(model))
    x = gn.unstack(views, model.branches).contiguous()  # (K, N, 3, H, W)
    return plain(ens, x, model.branches)


class GroupedConv1dHead(nn.Module):
    """K linear heads as one grouped ``nn.Conv1d`` over a length-1 sequence (Packed-Ensembles' default head)."""

    def __init__(self, linear: gn.GroupedLinear) -> None:
        super().__init__()
        k, out_f, in_f = linear.weight.shape
        self.conv = nn.Conv1d(k * in_f, k * out_f, 1, groups=k, bias=linear.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(linear.weight.reshape(k * out_f, in_f, 1))
            if linear.bias is not None:
                self.conv.bias.copy_(linear.bias.reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.unsqueeze(-1)).squeeze(-1)


def torch_conv(conv: gn.GroupedConv2d) -> nn.Module:
    out = nn.Conv2d(conv.branches * conv.in_channels, conv.branches * conv.out_channels, conv.kernel_size,
                    conv.stride, conv.padding, conv.dilation, conv.branches * conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(conv.weight)
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def torch_batch_norm(bn: nn.BatchNorm2d) -> nn.Module:
    out = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    out.load_state_dict(bn.state_dict())
    return out


def packed_tu_conv(conv: gn.GroupedConv2d) -> nn.Module:
    from torch_uncertainty.layers import PackedConv2d

    k = conv.branches
    out = PackedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, alpha=k, num_estimators=k, gamma=1,
                       stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       bias=conv.bias is not None)
    if out.conv.groups != k * conv.groups:
        raise AssertionError(f"PackedConv2d built {out.conv.groups} groups, expected {k * conv.groups}")
    with torch.no_grad():
        out.conv.weight.copy_(conv.weight)
        if conv.bias is not None:
            out.conv.bias.copy_(conv.bias)
    return out


def packed_tu_linear(linear: gn.GroupedLinear) -> nn.Module:
    from torch_uncertainty.layers import PackedLinear

    k = linear.branches
    out = PackedLinear(linear.in_features, linear.out_features, alpha=k, num_estimators=k, gamma=1,
                       bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.reshape(-1))
    return out


def swap_layers(model: nn.Module, conv: Callable, linear: Callable, batch_norm: Callable) -> nn.Module:
    """A copy of ``model`` with every grouped conv, linear and batch norm replaced by what the factories build."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, gn.GroupedConv2d):
                setattr(parent, name, conv(child))
            elif isinstance(child, gn.GroupedLinear):
                setattr(parent, name, linear(child))
            elif isinstance(child, gn.GroupedBatchNorm2d):
                setattr(parent, name, batch_norm(child))
    return model


def prepare_swapped(model: nn.Module, views: Tensor, conv: Callable, linear: Callable) -> Prepared:
    swapped = swap_layers(model, conv, linear, torch_batch_norm).to(memory_format=CL)
    swapped.execution_order = "grouped"  # torch's layers have no branch views: always one op per layer for all branches
    return plain(swapped, views.contiguous(memory_format=CL), model.branches)


def torch_uncertainty_missing() -> str | None:
    try:
        import torch_uncertainty.layers  # noqa: F401
    except Exception as e:  # ImportError, or its own import-time errors without lightning/torchvision
        return f"torch-uncertainty not importable here ({type(e).__name__}: {e}); run in the peers venv"
    return None


def prepare_compiled_loop(model: nn.Module, views: Tensor) -> Prepared:
    prepared = prepare_loop(model, views, channels_last=True)
    prepared.forward = torch.compile(prepared.module)
    return prepared


def prepare_compiled_groupnet(model: nn.Module, views: Tensor, mode: str) -> Prepared:
    prepared = prepare_groupnet(model, views, mode)
    prepared.forward = torch.compile(prepared.module)
    return prepared


def prepare_dense(case: ModelCase, views: Tensor) -> Prepared:
    torch.manual_seed(0)
    dense = build_model(case.arch, branches=1, num_classes=NUM_CLASSES).to(memory_format=CL)
    x = views[:, :3].contiguous(memory_format=CL)
    return Prepared(dense, dense, list(dense.parameters()), x, F.cross_entropy, None)


PEERS = ("groupnet", "groupnet-compile", "loop-nchw", "loop-cl", "vmap", "torch-grouped", "packed-tu", "compile-loop",
         "dense")


def prepare(peer: str, case: ModelCase) -> tuple[Prepared, Tensor]:
    """The peer's :class:`Prepared` for ``case`` and the targets; skips the test when the peer cannot run here."""
    torch.manual_seed(0)
    model = build_model(case.arch, branches=case.branches, num_classes=NUM_CLASSES)
    views, targets = model_data(case)
    if peer == "groupnet":
        return prepare_groupnet(model, views, case.mode), targets
    if peer == "groupnet-compile":
        return prepare_compiled_groupnet(model, views, case.mode), targets
    if peer in ("loop-nchw", "loop-cl"):
        return prepare_loop(model, views, channels_last=peer == "loop-cl"), targets
    if peer == "vmap":
        return prepare_vmap(model, views), targets
    if peer == "torch-grouped":
        return prepare_swapped(model, views, torch_conv, GroupedConv1dHead), targets
    if peer == "packed-tu":
        reason = torch_uncertainty_missing()
        if reason:
            pytest.skip(reason)
        return prepare_swapped(model, views, packed_tu_conv, packed_tu_linear), targets
    if peer == "compile-loop":
        return prepare_compiled_loop(model, views), targets
    if peer == "dense":
        return prepare_dense(case, views), targets
    raise ValueError(f"unknown peer {peer!r}; known: {PEERS}")


def check_same_function(prepared: Prepared, case: ModelCase) -> None:
    """The peer computes what the groupnet model computes (eval mode, fresh weights), or the benchmark is void."""
    if prepared.reference is None:
        return
    torch.manual_seed(0)
    model = build_model(case.arch, branches=case.branches, num_classes=NUM_CLASSES).eval()
    views, _ = model_data(case)
    ref_mod = prepared.reference
    was_training = ref_mod.training
    ref_mod.eval()
    with torch.no_grad():
        want = model(views)
        got = ref_mod(prepared.input)
    ref_mod.train(was_training)
    if got.dim() == 3:  # vmap's (K, N, classes) -> groupnet's (N, K*classes)
        got = got.transpose(0, 1).flatten(1)
    scale = want.abs().max().item() + 1e-6
    err = (got - want).abs().max().item()
    if err > 1e-3 * scale:
        raise AssertionError(f"{case.id}: peer output differs from groupnet's by {err:.3g} (scale {scale:.3g})")


def make_runner(peer: str, case: ModelCase) -> Callable[[], object]:
    """The function pytest-benchmark times: one training step or one inference forward of ``peer`` on ``case``."""
    prepared, targets = prepare(peer, case)
    check_same_function(prepared, case)
    return step_runner(prepared, targets, case.mode)


def step_runner(prepared: Prepared, targets: Tensor, mode: str) -> Callable[[], object]:
    """One training step (forward, loss, backward, SGD step) or one inference forward of a prepared peer."""
    forward, x = prepared.forward, prepared.input
    if mode == "infer":
        prepared.module.eval()

        def infer() -> Tensor:
            with torch.inference_mode():
                return forward(x)

        return infer
    prepared.module.train()
    opt = torch.optim.SGD(prepared.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = prepared.loss

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x), targets).backward()
        opt.step()

    return train_step
