"""The synchronised batch norm (groupnet.modules.sync_batchnorm): conversion replaces modules around the same
tensors, the converted layers stay the batch norms they were, and two processes (gloo) compute what one process
computes on the whole batch, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import groupnet as gn
from groupnet.models import build_model
from groupnet.modules import (
    GroupedBatchNorm1d,
    GroupedBatchNorm2d,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    SyncGroupedBatchNorm1d,
    SyncGroupedBatchNorm2d,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from groupnet.training import distributed
from helpers.tolerances import assert_close
from groupnet.training.optim import build_sgd


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_round_trip_keeps_state_dict_tensors_and_optimizer_references():
    model = build_model("resnet20", branches=2, num_classes=10)
    before = tensors(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_sgd(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert convert_sync_batchnorm(model) is model
    synced = [m for m in model.modules() if isinstance(m, GroupedBatchNorm2d)]
    assert synced and all(type(m) is SyncGroupedBatchNorm2d for m in synced)
    assert all(isinstance(m, nn.BatchNorm2d) for m in synced)
    after = tensors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the very same tensors
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}
    branch = gn.extract_branch(model, 1)
    assert {type(m) for m in branch.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {nn.BatchNorm2d}
    assert type(synced[0].branch(0)) is nn.BatchNorm2d

    assert revert_sync_batchnorm(model) is model
    assert {type(m) for m in model.modules() if isinstance(m, GroupedBatchNorm2d)} == {GroupedBatchNorm2d}
    again = tensors(model)
    assert all(again[k] is before[k] for k in before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_plain_and_grouped_batch_norms_of_every_rank_convert_and_revert():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3, bias=False), nn.BatchNorm3d(3, affine=False),
                          GroupedBatchNorm1d(3, branches=2),
                          GroupedBatchNorm2d(3, branches=2, track_running_stats=False), nn.SyncBatchNorm(3))
    model[0].train(False)
    convert_sync_batchnorm(model)
    assert [type(m) for m in model] == [SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, SyncGroupedBatchNorm1d,
                                        SyncGroupedBatchNorm2d, nn.SyncBatchNorm]
    assert not model[0].training and model[1].training
    assert model[1].bias is None and model[2].weight is None and model[4].running_mean is None
    assert all(not t.is_meta for t in model.state_dict().values())
    assert (model[3].branches, model[3].branch_features, model[3].num_features) == (2, 3, 6)
    revert_sync_batchnorm(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, GroupedBatchNorm1d,
                                        GroupedBatchNorm2d, nn.SyncBatchNorm]


def test_a_batch_norm_reached_twice_becomes_one_module_and_a_root_one_is_returned():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    convert_sync_batchnorm(model)
    assert model[0] is model[2] and type(model[0]) is SyncBatchNorm2d
    root = convert_sync_batchnorm(GroupedBatchNorm2d(4, branches=2))
    assert type(root) is SyncGroupedBatchNorm2d and type(revert_sync_batchnorm(root)) is GroupedBatchNorm2d


def test_what_cannot_be_converted_is_refused():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    with pytest.raises(TypeError, match="no synchronised counterpart for MyBatchNorm"):
        convert_sync_batchnorm(nn.Sequential(MyBatchNorm(3)))
    hooked = nn.Sequential(nn.BatchNorm2d(3))
    hooked[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks"):
        convert_sync_batchnorm(hooked)


def test_one_process_forward_is_the_plain_batch_norm():
    torch.manual_seed(0)
    grouped = GroupedBatchNorm2d(3, branches=2).double()
    synced = convert_sync_batchnorm(GroupedBatchNorm2d(3, branches=2).double())
    synced.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(synced(x), grouped(x))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), grouped.state_dict().values()))
    with pytest.raises(ValueError, match="channels"):
        synced(torch.randn(4, 5, 5, 5, dtype=torch.float64))
    skeleton = synced.branch_skeleton()
    assert type(skeleton) is SyncBatchNorm2d and skeleton.weight.is_meta


def test_training_distributed_reexports_the_conversion():
    assert distributed.convert_sync_batchnorm is convert_sync_batchnorm
    assert distributed.revert_sync_batchnorm is revert_sync_batchnorm


def _two_process_worker(rank: int, init_file: str, out_dir: str, x: torch.Tensor, w: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. a deprecated collective's FutureWarning
            warnings.simplefilter("always")
            bn = convert_sync_batchnorm(_batch_norm())
            part = x.chunk(2)[rank].clone().requires_grad_(True)
            (bn(part) * w.chunk(2)[rank]).sum().backward()
        grads = {"x": part.grad, "weight": bn.weight.grad, "bias": bn.bias.grad}
        torch.save({"grads": grads, "state": bn.state_dict(),
                    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _batch_norm() -> GroupedBatchNorm2d:
    torch.manual_seed(0)
    bn = GroupedBatchNorm2d(3, branches=2, momentum=None).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def test_two_processes_compute_the_whole_batch_forward_and_backward(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(6, 6, 4, 4, dtype=torch.float64)
    w = torch.randn(6, 6, 4, 4, dtype=torch.float64)
    mp.start_processes(_two_process_worker, args=(str(tmp_path / "init"), str(tmp_path), x, w), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["warnings"] for r in ranks] == [[], []]  # no deprecated collective, no other warning

    bn = _batch_norm()
    whole = x.clone().requires_grad_(True)
    (bn(whole) * w).sum().backward()
    grads = [r["grads"] for r in ranks]
    torch.testing.assert_close(torch.cat([g["x"] for g in grads]), whole.grad)
    for name in ("weight", "bias"):  # DDP sums the ranks' parameter gradients
        torch.testing.assert_close(grads[0][name] + grads[1][name], getattr(bn, name).grad)
    for r in ranks:
        for name, t in bn.state_dict().items():  # running statistics of the whole batch
            torch.testing.assert_close(r["state"][name], t, msg=name)


def test_groupnet_exports_the_conversion_and_it_round_trips_through_branch_extraction():
    assert gn.convert_sync_batchnorm is convert_sync_batchnorm and gn.revert_sync_batchnorm is revert_sync_batchnorm
    torch.manual_seed(0)
    model = build_model("resnet20", branches=2, num_classes=10).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = [gn.extract_branch(model, k)(x) for k in range(2)]
    gn.convert_sync_batchnorm(model)
    assert any(isinstance(m, SyncGroupedBatchNorm2d) for m in model.modules())
    for k in range(2):
        torch.testing.assert_close(gn.extract_branch(model, k)(x), expected[k], rtol=0, atol=0)
    gn.revert_sync_batchnorm(model)
    assert not any(isinstance(m, SyncGroupedBatchNorm2d) for m in model.modules())
    torch.testing.assert_close(gn.extract_branch(model, 1)(x), expected[1], rtol=0, atol=0)


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_torchs_own_conversion_keeps_branches_extractable_and_reverts_to_the_grouped_norms():
    torch.manual_seed(0)
    model = build_model("resnet20", branches=2, num_classes=10).double()
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64)
    model(x)  # a training step's running statistics: they differ between the branches
    model.eval()
    reference = gn.reference_of(model)  # K plain models: the per-branch reference
    expected = reference(x)
    before = tensors(model)
    state_keys = model.state_dict().keys()

    assert nn.SyncBatchNorm.convert_sync_batchnorm(model) is model  # what Lightning's sync_batchnorm=True calls
    assert _norm_types(model) == {nn.SyncBatchNorm}
    assert model.state_dict().keys() == state_keys
    assert_close(model(x), expected, kind="reference")  # torch's class computes the grouped norm (eval, one process)
    for k in range(2):
        branch = gn.extract_branch(model, k)
        assert _norm_types(branch) == {nn.BatchNorm2d}
        assert_close(branch(x[:, 3 * k:3 * k + 3]), expected[:, 10 * k:10 * k + 10], kind="reference")
        assert all(torch.equal(a, b) for a, b in zip(branch.state_dict().values(),
                                                    reference.branch_modules[k].state_dict().values()))

    assert gn.revert_sync_batchnorm(model) is model
    assert _norm_types(model) == {GroupedBatchNorm2d}
    after = tensors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the very same tensors
    assert_close(model(x), expected, kind="reference")


def test_torchs_conversion_of_a_stacked_model_and_a_lone_norm_and_groupnets_conversion_after_it():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5),
                            nn.BatchNorm1d(5)).double() for _ in range(2)]
    for m in models:
        m(torch.randn(4, 3, 8, 8, dtype=torch.float64))
        m.eval()
    stacked = gn.stack_models(models, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    stacked = nn.SyncBatchNorm.convert_sync_batchnorm(stacked)
    assert _norm_types(stacked) == {nn.SyncBatchNorm}
    for k in range(2):
        branch = gn.extract_branch(stacked, k)
        assert [type(m) for m in branch.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
            nn.BatchNorm2d, nn.BatchNorm1d]
        assert all(torch.equal(a, b) for a, b in zip(branch.state_dict().values(), models[k].state_dict().values()))
    assert gn.revert_sync_batchnorm(stacked) is stacked
    assert _norm_types(stacked) == {GroupedBatchNorm2d, GroupedBatchNorm1d}

    lone = nn.SyncBatchNorm.convert_sync_batchnorm(GroupedBatchNorm1d(3, branches=2, affine=False))
    assert type(lone) is nn.SyncBatchNorm and type(gn.extract_branch(lone, 1)) is nn.BatchNorm1d
    assert type(convert_sync_batchnorm(lone)) is SyncGroupedBatchNorm1d  # synchronised as grouped, on any backend
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert type(revert_sync_batchnorm(plain)) is nn.SyncBatchNorm  # torch's own from a plain norm stays
