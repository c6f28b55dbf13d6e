"""Op level: grouped conv (3x3 and 1x1, stride 1 and 2), grouped linear, the co-training loss; forward and
forward+backward, groupnet beside each peer on the same data.

Conv shapes are WRN-16-4's split widths (K=2: 96 channels per branch, K=4: 64) at batch 32; a stride-2 conv halves
32x32 and doubles the channels, as at a stage change. ``dense`` is the one unsplit op of about the same parameters
(channels times sqrt(K)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import groupnet as gn
from groupnet.cotraining import CoTrainingLoss
from groupnet.reference import cotraining_loss_reference

from cases import op_rounds, quick
from peers import GroupedConv1dHead, packed_tu_conv, packed_tu_linear, torch_conv, torch_uncertainty_missing

CL = torch.channels_last
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class ConvCase:
    branches: int
    kernel: int
    stride: int
    mode: str
    batch: int = 32

    @property
    def channels(self) -> int:
        return {2: 96, 4: 64}[self.branches]

    @property
    def in_channels(self) -> int:
        return self.channels // self.stride

    @property
    def size(self) -> int:
        return 16 * self.stride

    @property
    def id(self) -> str:
        k = self.kernel
        return f"conv{k}x{k}-s{self.stride}-K{self.branches}-C{self.channels}-b{self.batch}-{self.mode}"


@dataclass(frozen=True)
class LinearCase:
    branches: int
    in_features: int
    out_features: int
    mode: str
    batch: int = 128

    @property
    def id(self) -> str:
        return f"linear-{self.in_features}x{self.out_features}-K{self.branches}-b{self.batch}-{self.mode}"


@dataclass(frozen=True)
class LossCase:
    branches: int
    classes: int
    batch: int = 128

    @property
    def id(self) -> str:
        return f"cotrain-loss-K{self.branches}-C{self.classes}-b{self.batch}-fwdbwd"


def timed(fn: Callable[[], Tensor], mode: str, inputs: list[Tensor]) -> Callable[[], object]:
    """``fn`` under inference mode, or forward plus backward of a fixed random output gradient."""
    if mode == "fwd":
        def forward() -> Tensor:
            with torch.inference_mode():
                return fn()
        return forward
    for t in inputs:
        t.requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(fn())

    def forward_backward() -> None:
        fn().backward(grad)
        for t in inputs:
            t.grad = None

    return forward_backward


def run(benchmark, case, peer: str, fn: Callable[[], object]) -> None:
    benchmark.group = case.id
    benchmark.extra_info.update(level="op", case=case.id, peer=peer)
    warmup, n = op_rounds()
    benchmark.pedantic(fn, rounds=n, iterations=1, warmup_rounds=warmup)


# ---- grouped conv ----------------------------------------------------------------------------------------------

CONV_PEERS = ("groupnet", "loop-nchw", "loop-cl", "vmap", "torch-grouped", "packed-tu", "dense")
CONV_CASES = [ConvCase(k, ks, s, m) for k in (2, 4) for ks in (3, 1) for s in (1, 2) for m in MODES]
if quick():  # every peer on one conv per mode
    CONV_CASES = [c for c in CONV_CASES if (c.branches, c.kernel, c.stride) == (2, 3, 1)]


def conv_runner(case: ConvCase, peer: str) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    k, cin, cout, pad = case.branches, case.in_channels, case.channels, case.kernel // 2
    x = torch.randn(case.batch, k * cin, case.size, case.size, generator=g)
    torch.manual_seed(0)
    conv = gn.GroupedConv2d(cin, cout, case.kernel, branches=k, stride=case.stride, padding=pad, bias=False)
    if peer == "groupnet":
        conv, xc = conv.to(memory_format=CL), x.contiguous(memory_format=CL)  # weights too, as model.to(CL) does
        return timed(lambda: conv(xc), case.mode, [xc, *conv.parameters()])
    if peer in ("loop-nchw", "loop-cl"):
        loop = gn.reference_of(conv)
        xc = x
        if peer == "loop-cl":
            loop, xc = loop.to(memory_format=CL), x.contiguous(memory_format=CL)
        return timed(lambda: loop(xc), case.mode, [xc, *loop.parameters()])
    if peer == "vmap":
        w = conv.weight.detach().unflatten(0, (k, cout)).clone()
        xk = gn.unstack(x, k).contiguous()

        def one(wk: Tensor, xi: Tensor) -> Tensor:
            return F.conv2d(xi, wk, None, case.stride, pad)

        return timed(lambda: torch.func.vmap(one)(w, xk), case.mode, [xk, w])
    if peer in ("torch-grouped", "packed-tu"):
        if peer == "packed-tu" and (reason := torch_uncertainty_missing()):
            pytest.skip(reason)
        mod = (torch_conv if peer == "torch-grouped" else packed_tu_conv)(conv).to(memory_format=CL)
        xc = x.contiguous(memory_format=CL)
        return timed(lambda: mod(xc), case.mode, [xc, *mod.parameters()])
    if peer == "dense":
        cd, cind = round(cout * math.sqrt(k)), round(cin * math.sqrt(k))
        mod = nn.Conv2d(cind, cd, case.kernel, case.stride, pad, bias=False).to(memory_format=CL)
        xd = torch.randn(case.batch, cind, case.size, case.size, generator=g).contiguous(memory_format=CL)
        return timed(lambda: mod(xd), case.mode, [xd, *mod.parameters()])
    raise ValueError(peer)


@pytest.mark.parametrize("case,peer", [(c, p) for c in CONV_CASES for p in CONV_PEERS],
                         ids=[f"{c.id}-{p}" for c in CONV_CASES for p in CONV_PEERS])
def test_conv(benchmark, case, peer):
    run(benchmark, case, peer, conv_runner(case, peer))


# ---- grouped linear --------------------------------------------------------------------------------------------

LINEAR_PEERS = ("groupnet", "loop", "vmap", "torch-grouped", "einsum", "packed-tu", "dense")
# the classifier heads of split WRN-16-4 (K=2: 192 features, K=4: 128) and an MLP layer
LINEAR_CASES = [LinearCase(k, f, o, m) for k, f, o in ((2, 192, 10), (4, 128, 10), (2, 512, 512), (4, 512, 512))
                for m in MODES]
if quick():
    LINEAR_CASES = LINEAR_CASES[:len(MODES)]


def linear_runner(case: LinearCase, peer: str) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    k, fin, fout = case.branches, case.in_features, case.out_features
    x = torch.randn(case.batch, k * fin, generator=g)
    torch.manual_seed(0)
    lin = gn.GroupedLinear(fin, fout, branches=k)
    if peer == "groupnet":
        return timed(lambda: lin(x), case.mode, [x, *lin.parameters()])
    if peer == "loop":
        loop = gn.reference_of(lin)
        return timed(lambda: loop(x), case.mode, [x, *loop.parameters()])
    if peer == "vmap":
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        xk = x.unflatten(1, (k, fin)).transpose(0, 1).contiguous()
        return timed(lambda: torch.func.vmap(F.linear)(xk, w, b), case.mode, [xk, w, b])
    if peer == "torch-grouped":
        head = GroupedConv1dHead(lin)
        return timed(lambda: head(x), case.mode, [x, *head.parameters()])
    if peer == "einsum":
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()

        def einsum() -> Tensor:
            return (torch.einsum("nki,koi->nko", x.unflatten(1, (k, fin)), w) + b).flatten(1)

        return timed(einsum, case.mode, [x, w, b])
    if peer == "packed-tu":
        if reason := torch_uncertainty_missing():
            pytest.skip(reason)
        mod = packed_tu_linear(lin)
        return timed(lambda: mod(x), case.mode, [x, *mod.parameters()])
    if peer == "dense":
        fo = fout if fout == 10 else round(fout * math.sqrt(k))  # a classifier keeps its classes
        mod = nn.Linear(round(fin * math.sqrt(k)), fo)
        xd = torch.randn(case.batch, mod.in_features, generator=g)
        return timed(lambda: mod(xd), case.mode, [xd, *mod.parameters()])
    raise ValueError(peer)


@pytest.mark.parametrize("case,peer", [(c, p) for c in LINEAR_CASES for p in LINEAR_PEERS],
                         ids=[f"{c.id}-{p}" for c in LINEAR_CASES for p in LINEAR_PEERS])
def test_linear(benchmark, case, peer):
    run(benchmark, case, peer, linear_runner(case, peer))


# ---- co-training loss ------------------------------------------------------------------------------------------

LOSS_PEERS = ("groupnet", "loop", "dense")
LOSS_CASES = [LossCase(k, c) for k in (2, 4) for c in (10, 100)]
if quick():
    LOSS_CASES = LOSS_CASES[:1]


def loss_runner(case: LossCase, peer: str) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    k, c = case.branches, case.classes
    logits = torch.randn(case.batch, k * c, generator=g)
    y = torch.randint(0, c, (case.batch,), generator=g)
    if peer == "groupnet":
        loss = CoTrainingLoss(k, weight=0.5)
        fn = lambda: loss(logits, y).loss  # noqa: E731
    elif peer == "loop":
        fn = lambda: cotraining_loss_reference(logits, y, k, weight=0.5)[0]  # noqa: E731
    elif peer == "dense":
        one = logits[:, :c].contiguous()
        fn = lambda: F.cross_entropy(one, y)  # noqa: E731
        return timed(fn, "fwdbwd", [one])
    else:
        raise ValueError(peer)
    return timed(fn, "fwdbwd", [logits])


@pytest.mark.parametrize("case,peer", [(c, p) for c in LOSS_CASES for p in LOSS_PEERS],
                         ids=[f"{c.id}-{p}" for c in LOSS_CASES for p in LOSS_PEERS])
def test_cotraining_loss(benchmark, case, peer):
    run(benchmark, case, peer, loss_runner(case, peer))
