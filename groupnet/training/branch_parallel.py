"""Branch parallelism: the K branches of a grouped model spread over ranks, combined with data parallelism.

The ranks form a 2-D device mesh ``(data, branch)`` of shape ``(D, B)`` (:func:`init_device_mesh`), rank ``r`` at
``(r // B, r % B)``. The B ranks of a branch group (one mesh row) hold branch groups ``0..B-1``: rank ``(d, b)``
holds branches ``[b*K/B, (b+1)*K/B)`` as a grouped model of ``K/B`` branches, and trains on data shard ``d`` of D.
What makes a run equal to the single-process run of the same seed and global batch:

- Weights: the full K-branch model is built once on the CPU from the seed and cut (:func:`shard_model`); every
  branch-stacked tensor of a grouped layer is K blocks along dim 0, so branch group b's part is block b of B.
  Other tensors (the batch counter of the batch norms) are copied whole.
- Views: the data loader draws the K views of each sample, as in one process, and the rank keeps its branches'
  channels (:func:`local_views`), so its branches receive exactly the views the single-process run gives them.
- Loss: each rank gathers the logits ``(K/B, N, C)`` of its branch group with one differentiable all-gather over the
  branch dimension and computes the very same co-training loss on ``(K, N, C)`` (the same op, so the same
  formula for every divergence and temperature). Every rank of the group computes the whole loss; the gather's
  backward sums the B ranks' gradients into each owner, so each rank back-propagates ``loss / B``.
  Gathering logits rather than log-probabilities costs the same bytes and lets the cross-entropy (temperature 1)
  and the divergence (temperature T) share one collective.
- Gradients: averaged over the D data-parallel ranks that hold the same branches (one all-reduce of all gradients
  over the data dimension, never over the branch dimension); batch norms take their statistics over the data
  group (:func:`groupnet.training.distributed.convert_sync_batchnorm` with that group).
- Inference: each rank runs its branches on the same input, one all-gather (or gather to rank 0) over the branch
  dimension gives ``(K, N, C)``, and :func:`groupnet.ensembling.ensemble` combines it as in one process.
- Checkpoints hold the full model: :func:`full_state_dict` gathers it over the branch dimension, and
  :func:`shard_state_dict` cuts a full state for any layout, so one file serves B = 1, 2, ..., K.

Bad layouts (B not dividing K, a world size B does not divide, ranks that disagree on K or B) raise the same
ValueError on every rank before any rank waits on a collective of the layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groupnet.cotraining import CoTrainingLoss, CoTrainingOutput
from groupnet.ensembling import EnsembleMode, ensemble
from groupnet.models import GroupedClassifier, build_from_spec
from groupnet.modules.registry import is_grouped_layer
from groupnet.modules.sync_batchnorm import convert_sync_batchnorm
from groupnet.training.hooks import TrainingHook

__all__ = [
    "BranchLayout", "BranchParallel", "BranchParallelModel", "BranchParallelStep", "branch_stacked_keys",
    "check_layout", "communication_bytes",
    "full_optimizer_state", "full_state_dict", "local_views", "shard_model", "shard_optimizer_state",
    "shard_state_dict",
]

MESH_DIMS = ("data", "branch")


def check_layout(branches: int, branch_groups: int, world_size: int) -> None:
    """Raise ValueError unless B = ``branch_groups`` divides both K = ``branches`` and the world size."""
    for name, v in (("branches (K)", branches), ("branch groups (B, --branch-parallel)", branch_groups),
                    ("world size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"branch parallelism: {name} must be a positive int, got {v!r}")
    if branches % branch_groups:
        raise ValueError(f"branch parallelism: B={branch_groups} branch groups must divide the K={branches} "
                         f"branches (each rank holds K/B of them); pick B among "
                         f"{[d for d in range(1, branches + 1) if branches % d == 0]}")
    if world_size % branch_groups:
        raise ValueError(f"branch parallelism: the world size {world_size} must be a multiple of B={branch_groups} "
                         f"(ranks form a data x branch mesh of shape (world / B, B))")


@dataclass(frozen=True)
class BranchLayout:
    """Where a rank sits in the ``(data, branch)`` mesh and which branches it holds; pure arithmetic, no groups."""

    branches: int
    branch_groups: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        check_layout(self.branches, self.branch_groups, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"branch parallelism: rank {self.rank} outside the world of {self.world_size}")

    @property
    def data_size(self) -> int:
        """D, the data-parallel size: ranks that hold the same branches."""
        return self.world_size // self.branch_groups

    @property
    def branch_rank(self) -> int:
        """b: this rank's branch group, its coordinate on the branch dimension."""
        return self.rank % self.branch_groups

    @property
    def data_rank(self) -> int:
        """d: this rank's data shard, its coordinate on the data dimension."""
        return self.rank // self.branch_groups

    @property
    def local_branches(self) -> int:
        """K/B."""
        return self.branches // self.branch_groups

    @property
    def first_branch(self) -> int:
        return self.branch_rank * self.local_branches

    @property
    def branch_range(self) -> range:
        """The global indices of this rank's branches."""
        return range(self.first_branch, self.first_branch + self.local_branches)


class BranchParallel:
    """This rank's mesh and process groups for a K-branch model over B branch groups; the collectives of a
    branch-parallel step.

    Needs an initialised default process group (``torch.distributed.init_process_group``) whose world size B
    divides. ``device_type`` is the mesh's device (``"cpu"`` with gloo, ``"cuda"`` with nccl).
    """

    def __init__(self, branches: int, branch_groups: int, device_type: str = "cpu") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("BranchParallel needs an initialised process group (torch.distributed."
                               "init_process_group, or torchrun with the trainer)")
        world, rank = dist.get_world_size(), dist.get_rank()
        # Every rank checks the same numbers, so a bad layout fails on all of them at once; then the ranks compare
        # their K and B (one all-gather), so a mismatched launch fails everywhere instead of hanging in a collective.
        check_layout(branches, branch_groups, world)
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, (branches, branch_groups))
        if len(set(seen)) > 1:
            detail = ", ".join(f"rank {r}: K={k} B={b}" for r, (k, b) in enumerate(seen))
            raise ValueError(f"branch parallelism: the ranks disagree on the layout ({detail})")
        self.layout = BranchLayout(branches, branch_groups, world, rank)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device_type, (self.layout.data_size, branch_groups), mesh_dim_names=MESH_DIMS)
        self.data_group = self.mesh.get_group("data")
        self.branch_group = self.mesh.get_group("branch")
        assert self.mesh.get_local_rank("branch") == self.layout.branch_rank
        assert self.mesh.get_local_rank("data") == self.layout.data_rank

    # -------------------------------------------------------------------------------------------- model
    def shard(self, full: nn.Module, sync_batchnorm: bool = True) -> nn.Module:
        """This rank's model cut from ``full`` (:func:`shard_model`), its batch norms synchronised over the data
        dimension when D > 1 and ``sync_batchnorm``."""
        local = shard_model(full, self.layout)
        if self.layout.data_size > 1 and sync_batchnorm:
            convert_sync_batchnorm(local, self.data_group)
        return local

    def local_views(self, x: Tensor, in_channels: int) -> Tensor:
        """This rank's branches' channels of a K-view batch (see :func:`local_views`)."""
        return local_views(x, self.layout, in_channels)

    # -------------------------------------------------------------------------------------------- training
    def gather_logits(self, local_logits: Tensor) -> Tensor:
        """``(N, K/B * C)`` logits of this rank's branches -> ``(K, N, C)`` of all branches, differentiable (the
        backward sums every rank's gradient of its gathered copy into the owner)."""
        from torch.distributed import _functional_collectives as funcol

        kb = self.layout.local_branches
        z = local_logits.unflatten(1, (kb, -1)).transpose(0, 1).contiguous()  # (K/B, N, C)
        if self.layout.branch_groups == 1:
            return z
        return funcol.all_gather_single_autograd(z, 0, self.branch_group)

    def loss(self, loss_fn: CoTrainingLoss, local_logits: Tensor,
             targets: Tensor) -> tuple[CoTrainingOutput, Tensor, Tensor]:
        """The single-process co-training loss of all K branches; the term to back-propagate on this rank
        (``loss / B``: the B ranks of a branch group compute the same loss, and the gather's backward adds their
        gradients); and all branches' logits ``(K, N, C)``. ``loss_fn`` is built for the full K."""
        if loss_fn.branches != self.layout.branches:
            raise ValueError(f"branch parallelism: the loss is built for K={loss_fn.branches} branches, the layout "
                             f"has K={self.layout.branches}")
        z = self.gather_logits(local_logits)
        out = loss_fn(z, targets)
        return out, out.loss / self.layout.branch_groups, z

    def all_reduce_gradients(self, model: nn.Module) -> None:
        """Average the gradients over the data dimension (one flat all-reduce); nothing when D = 1."""
        if self.layout.data_size == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.layout.data_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self, model: nn.Module, x: Tensor, targets: Tensor, loss_fn: CoTrainingLoss,
             scale=lambda t: t) -> tuple[CoTrainingOutput, Tensor]:
        """Forward of this rank's branches on their views of the K-view batch ``x``, the co-training loss of all
        branches, backward, gradients averaged over the data dimension. Returns the loss output and all K
        branches' logits ``(N, K*C)`` (detached), as one process would see them. ``scale`` wraps the loss before
        backward (a grad scaler's ``scale``)."""
        in_channels = _in_channels(model)
        local_logits = model(self.local_views(x, in_channels))
        out, backward_loss, z = self.loss(loss_fn, local_logits, targets)
        scale(backward_loss).backward()
        self.all_reduce_gradients(model)
        return out, z.detach().transpose(0, 1).flatten(1)

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, model: nn.Module, x: Tensor, mode: EnsembleMode = "logits",
                dst: int | None = None) -> tuple[Tensor, Tensor] | None:
        """Ensemble prediction of all K branches for one input ``x`` shared by the branches (``(N, C, H, W)``)
        or a K-view batch. One collective over the branch dimension: an all-gather (``dst=None``: the result on
        every rank) or a gather to the branch group's rank ``dst`` (others get None). Returns the per-branch
        logits ``(K, N, C)`` and the ensemble scores ``(N, C)`` of :func:`groupnet.ensembling.ensemble`."""
        local = model(self.local_views(x, _in_channels(model)))
        kb = self.layout.local_branches
        z = local.unflatten(1, (kb, -1)).transpose(0, 1).contiguous()
        if self.layout.branch_groups > 1:
            if dst is None:
                parts = [torch.empty_like(z) for _ in range(self.layout.branch_groups)]
                dist.all_gather(parts, z, group=self.branch_group)
            else:
                parts = ([torch.empty_like(z) for _ in range(self.layout.branch_groups)]
                         if self.layout.branch_rank == dst else None)
                dist.gather(z, parts, group_dst=dst, group=self.branch_group)
                if parts is None:
                    return None
            z = torch.cat(parts, 0)
        return z, ensemble(z, self.layout.branches, mode)

    # -------------------------------------------------------------------------------------------- checkpoints
    def full_state_dict(self, local: nn.Module) -> dict[str, Tensor]:
        """The full K-branch model's state dict (on the CPU), gathered over the branch dimension; every rank
        gets it (see :func:`full_state_dict`)."""
        return full_state_dict(local, self.layout, self.branch_group)

    def load_full_state_dict(self, local: nn.Module, state: dict[str, Tensor]) -> None:
        """Load this rank's part of a full K-branch state dict into ``local``."""
        local.load_state_dict(shard_state_dict(state, branch_stacked_keys(local), self.layout))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, local: nn.Module) -> dict[str, Any]:
        """The optimizer state of the full model (see :func:`full_optimizer_state`); every rank gets it."""
        return full_optimizer_state(optimizer, local, self.layout, self.branch_group)

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, local: nn.Module,
                                  state: dict[str, Any]) -> None:
        """Load this rank's part of a full model's optimizer state (see :func:`shard_optimizer_state`)."""
        optimizer.load_state_dict(shard_optimizer_state(state, optimizer, local, self.layout))

    def communication_bytes(self, batch: int, num_classes: int, params: int, element_size: int = 4) -> dict[str, int]:
        """Bytes each rank sends per training step: the logits all-gather (forward; the same again in its backward)
        over the branch dimension, and the gradient all-reduce over the data dimension (ring: 2 (D-1)/D of the
        gradient). ``batch`` is this rank's batch, ``params`` this rank's parameter count."""
        return communication_bytes(self.layout, batch, num_classes, params, element_size)


class BranchParallelModel(nn.Module):
    """This rank's branches behind the full model's interface, for the trainer: ``forward`` takes the K-view batch
    (or a shared view) and returns all K branches' logits ``(N, K*C)``, gathered over the branch dimension with the
    differentiable all-gather. ``module`` is the rank's grouped model; save the full model with
    :meth:`BranchParallel.full_state_dict`, not with this module's ``state_dict``."""

    def __init__(self, module: nn.Module, bp: BranchParallel) -> None:
        super().__init__()
        self.module = module
        self.bp = bp
        self.branches, self.in_channels = bp.layout.branches, _in_channels(module)
        self.num_classes = module.num_classes

    def forward(self, x: Tensor) -> Tensor:
        z = self.bp.gather_logits(self.module(self.bp.local_views(x, self.in_channels)))  # (K, N, C)
        return z.transpose(0, 1).flatten(1)


class BranchParallelStep(TrainingHook):
    """The trainer's training step under branch parallelism: forward of a :class:`BranchParallelModel` (all K
    logits), the co-training loss, backward of ``loss / B`` (see :meth:`BranchParallel.loss`), gradients averaged
    over the data dimension. Its state is the layout only, so it keeps none in the checkpoint."""

    name = "branch_parallel"

    def __init__(self, bp: BranchParallel) -> None:
        self.bp = bp

    def step(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Any) -> tuple[CoTrainingOutput, Tensor]:
        import contextlib

        amp = torch.autocast("cuda", dtype=torch.float16) if ctx.amp else contextlib.nullcontext()
        with amp:
            logits = model(x)
        out = ctx.loss_fn(logits.float(), target)
        ctx.scaler.scale(out.loss / self.bp.layout.branch_groups).backward()
        self.bp.all_reduce_gradients(model)
        return out, logits


def communication_bytes(layout: BranchLayout, batch: int, num_classes: int, params: int,
                        element_size: int = 4) -> dict[str, int]:
    """See :meth:`BranchParallel.communication_bytes` (ring collectives: an all-gather of P parts sends P-1 of
    them per rank; an all-reduce of S bytes sends 2 S (P-1)/P)."""
    b, d = layout.branch_groups, layout.data_size
    part = layout.local_branches * batch * num_classes * element_size
    gather = (b - 1) * part
    grads = 2 * params * element_size * (d - 1) // d
    return {"logits_all_gather": gather, "logits_grad_backward": gather, "gradient_all_reduce": grads,
            "total": 2 * gather + grads}


# ------------------------------------------------------------------------------------------------ pure functions
def _in_channels(model: nn.Module) -> int:
    c = getattr(model, "in_channels", None)
    if not isinstance(c, int):
        raise TypeError(f"branch parallelism needs a model with an int in_channels (a zoo model), got "
                        f"{type(model).__name__}")
    return c


def local_views(x: Tensor, layout: BranchLayout, in_channels: int) -> Tensor:
    """The channels of this rank's branches in a K-view batch ``(N, K*C, H, W)``; a view shared by all branches
    ``(N, C, H, W)`` is returned as is."""
    k, c = layout.branches, in_channels
    if x.dim() == 4 and x.shape[1] == k * c and k > 1:
        lo = layout.first_branch * c
        return x[:, lo:lo + layout.local_branches * c]
    if x.dim() == 4 and x.shape[1] == c:
        return x
    raise ValueError(f"branch parallelism expects (N, {k * c}, H, W) (one view per branch) or (N, {c}, H, W) "
                     f"(a shared view), got shape {tuple(x.shape)}")


def branch_stacked_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the tensors that hold all branches as K blocks along dim 0 (the grouped layers'
    parameters and running statistics); the others are shared by the branches."""
    keys: set[str] = set()
    for prefix, m in model.named_modules():
        if not is_grouped_layer(m):
            continue
        per_branch = set(m.branch_tensors()[0])
        own = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        for name, t in own.items():
            if name in per_branch and t is not None and t.dim() > 0:
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def shard_state_dict(full: dict[str, Tensor], stacked: set[str], layout: BranchLayout) -> dict[str, Tensor]:
    """This rank's part of a full K-branch state dict: block ``b`` of ``B`` of every branch-stacked tensor, the
    other tensors whole."""
    out = {}
    for key, t in full.items():
        if key in stacked:
            if t.shape[0] % layout.branch_groups:
                raise ValueError(f"branch parallelism: {key} has {t.shape[0]} rows, not a multiple of "
                                 f"B={layout.branch_groups}")
            t = t.chunk(layout.branch_groups, 0)[layout.branch_rank]
        out[key] = t.clone()
    return out


def shard_model(full: nn.Module, layout: BranchLayout) -> nn.Module:
    """The grouped model of this rank's K/B branches, its weights and statistics those branches of ``full`` (a
    zoo model of K branches); the same per-branch architecture (no re-division for K/B)."""
    if not isinstance(full, GroupedClassifier):
        raise TypeError(f"branch parallelism cuts zoo models (GroupedClassifier), got {type(full).__name__}")
    if full.branches != layout.branches:
        raise ValueError(f"branch parallelism: the model has K={full.branches} branches, the layout "
                         f"K={layout.branches}")
    ref = next(full.parameters())
    local = build_from_spec(full.spec, branches=layout.local_branches, num_classes=full.num_classes,
                            in_channels=full.in_channels).to(device=ref.device, dtype=ref.dtype)
    local.execution_order = full.execution_order
    local.load_state_dict(shard_state_dict(full.state_dict(), branch_stacked_keys(full), layout))
    return local.train(full.training)


def full_state_dict(local: nn.Module, layout: BranchLayout, group: dist.ProcessGroup | None) -> dict[str, Tensor]:
    """The full model's state dict from the B ranks' parts (one object all-gather over ``group``, the branch
    dimension), on the CPU: branch-stacked tensors concatenated in branch order, the others taken from branch
    group 0."""
    state = {k: v.detach().cpu() for k, v in local.state_dict().items()}
    if layout.branch_groups == 1:
        return {k: v.clone() for k, v in state.items()}
    parts: list[Any] = [None] * layout.branch_groups
    dist.all_gather_object(parts, state, group=group)
    stacked = branch_stacked_keys(local)
    return {k: torch.cat([p[k] for p in parts], 0) if k in stacked else parts[0][k].clone() for k in state}


def _param_keys(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The model's parameter name of each optimizer state index (the optimizer's parameter-group order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, local: nn.Module, layout: BranchLayout,
                         group: dist.ProcessGroup | None) -> dict[str, Any]:
    """The optimizer state dict of the full model: per-parameter state tensors shaped like a branch-stacked
    parameter (SGD's momentum) gathered as :func:`full_state_dict` gathers the parameter. The parameter order of a
    grouped model does not depend on K, so the indices are the full model's."""
    state = optimizer.state_dict()
    if layout.branch_groups == 1:
        return copy.deepcopy(state)
    keys, stacked = _param_keys(optimizer, local), branch_stacked_keys(local)
    params = dict(local.named_parameters())
    cpu = {i: {n: (v.detach().cpu() if isinstance(v, Tensor) else v) for n, v in s.items()}
           for i, s in state["state"].items()}
    parts: list[Any] = [None] * layout.branch_groups
    dist.all_gather_object(parts, cpu, group=group)
    merged: dict[int, dict[str, Any]] = {}
    for i, s in cpu.items():
        key = keys[i]
        merged[i] = {}
        for n, v in s.items():
            per_param = isinstance(v, Tensor) and v.shape == params[key].shape
            merged[i][n] = (torch.cat([p[i][n] for p in parts], 0) if per_param and key in stacked else v)
    return {"state": merged, "param_groups": copy.deepcopy(state["param_groups"])}


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, local: nn.Module,
                          layout: BranchLayout) -> dict[str, Any]:
    """This rank's part of a full model's optimizer state dict for ``optimizer`` over ``local`` (the inverse of
    :func:`full_optimizer_state`)."""
    keys, stacked = _param_keys(optimizer, local), branch_stacked_keys(local)
    params = dict(local.named_parameters())
    out: dict[int, dict[str, Any]] = {}
    for i, s in state["state"].items():
        key = keys[int(i)]
        full_shape = (params[key].shape[0] * layout.branch_groups, *params[key].shape[1:])
        out[i] = {}
        for n, v in s.items():
            if isinstance(v, Tensor) and key in stacked and v.shape == full_shape:
                v = v.chunk(layout.branch_groups, 0)[layout.branch_rank]
            out[i][n] = v.clone() if isinstance(v, Tensor) else v
    return {"state": out, "param_groups": copy.deepcopy(state["param_groups"])}
