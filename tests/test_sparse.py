"""groupnet.sparse: ERK/uniform densities from one branch's shape, exact per-(branch, layer) counts, masks held on
weights and optimizer state, magnitude pruning, RigL gradient regrowth, ITOP rates, independence of branches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from groupnet import GroupedConv2d, GroupedLinear, use_backend
from groupnet.models import build_model
from groupnet.model_stacking import extract_branch
from groupnet.sparse import (
    DynamicSparseTraining,
    Masking,
    erk_densities,
    itop_stats,
    maskable_weights,
    uniform_densities,
)
from groupnet.sparse.dst import select


def tiny(k: int = 2, dtype=torch.float64) -> nn.Module:
    """conv(2->4, 3x3) | linear(4->10) | linear(10->2), per branch."""
    return nn.Sequential(GroupedConv2d(2, 4, 3, branches=k, dtype=dtype), GroupedLinear(4, 10, branches=k, dtype=dtype),
                         GroupedLinear(10, 2, branches=k, dtype=dtype))


def small_cnn(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", branches=k, num_classes=10, in_channels=1)


def train_steps(model, masking, dst, steps, opt, seed=0, check=None, start=1):
    k = masking.branches
    g = torch.Generator().manual_seed(seed)
    for s in range(start, start + steps):
        x = torch.randn(8, k, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        logits = model(x).view(8, k, 10).transpose(0, 1).reshape(k * 8, 10)
        nn.functional.cross_entropy(logits, y.repeat(k)).backward()
        opt.step()
        changed = dst.step(s)
        if check is not None:
            check(s, changed)


# ------------------------------------------------------------------------------------------------ initialisation
def test_erk_reproduces_the_official_fixed_point_on_a_hand_checked_network():
    """One branch: A conv (4, 2, 3, 3): N=72, raw=12/72=1/6; B linear (10, 4): N=40, raw=14/40=0.35; C linear (2, 10):
    N=20, raw=12/20=0.6. Density 0.5, budget 66 weights. First eps = 66 / (72/6 + 40*0.35 + 20*0.6) = 66/38, and
    C's 0.6*66/38 = 1.04 > 1: C becomes dense. Then eps = (36 + 20 - 10) / (12 + 14) = 46/26, so A = 46/26/6 = 23/78,
    B = 0.35*46/26 = 161/260, C = 1 (and 72*23/78 + 40*161/260 + 20 = 66)."""
    model = tiny(k=3)
    masking = Masking(model, 0.5, init="erk")
    assert [w.branch_shape for w in masking.layers] == [(4, 2, 3, 3), (10, 4), (2, 10)]
    got = masking.layer_density
    assert got["0.weight"] == pytest.approx(23 / 78, rel=1e-12)
    assert got["1.weight"] == pytest.approx(161 / 260, rel=1e-12)
    assert got["2.weight"] == 1.0
    # the stacked shape (K*out, ...) would give other densities: the pitfall the per-branch shape avoids
    stacked = erk_densities({"a": (12, 2, 3, 3), "b": (3, 10, 4), "c": (3, 2, 10)}, 0.5)
    assert stacked["a"] != pytest.approx(23 / 78)
    # exact counts per branch: round(density * numel)
    assert [masking.expected_active(w.name) for w in masking.layers] == [round(72 * 23 / 78), round(40 * 161 / 260), 20]
    for w in masking.layers:
        assert masking.active_counts(w.name).tolist() == [masking.expected_active(w.name)] * 3


def test_dense_first_last_keeps_the_overall_budget():
    shapes = {"a": (16, 3, 3, 3), "b": (32, 16, 3, 3), "c": (10, 32)}
    for fn in (erk_densities, uniform_densities):
        d = fn(shapes, 0.3, dense={"a", "c"})
        assert d["a"] == d["c"] == 1.0
        n = {k: math.prod(s) for k, s in shapes.items()}
        assert sum(d[k] * n[k] for k in shapes) == pytest.approx(0.3 * sum(n.values()))
    with pytest.raises(ValueError, match="dense layers .* alone hold"):
        uniform_densities(shapes, 0.01, dense={"b"})
    masking = Masking(small_cnn(2), 0.3, dense_first_last=True)
    assert masking.layer_density["conv1.weight"] == masking.layer_density["head.weight"] == 1.0


@settings(max_examples=12)
@given(density=st.floats(0.02, 1.0), k=st.integers(1, 3), init=st.sampled_from(["erk", "uniform"]),
       seed=st.integers(0, 1000))
def test_overall_density_equals_the_target(density, k, init, seed):
    masking = Masking(small_cnn(k), density, init=init, seed=seed)
    masking.check_counts()
    total = sum(w.numel for w in masking.layers)
    # each (branch, layer) rounds its count to the nearest integer (at least 1)
    tolerance = len(masking.layers) / total
    for b in range(k):
        assert abs(masking.density(b) - density) <= tolerance
    assert masking.sparsity() == pytest.approx(1 - masking.density())
    densities = erk_densities({w.name: w.branch_shape for w in masking.layers}, density) if init == "erk" else None
    if densities is not None:  # the float densities themselves hit the target exactly
        assert sum(densities[w.name] * w.numel for w in masking.layers) == pytest.approx(density * total)


def test_masks_cover_conv_and_linear_weights_only():
    model = small_cnn(2)
    names = [w.name for w in maskable_weights(model)]
    assert names == ["conv1.weight", "features.2.conv.weight", "features.4.conv.weight", "head.weight"]
    assert not any("bias" in n or "bn" in n for n in names)


def test_branches_get_different_masks():
    masking = Masking(small_cnn(3), 0.2, seed=5)
    for w in masking.layers:
        if masking.layer_density[w.name] == 1.0:
            continue
        m = masking.branch_view(w.name, masking.masks[w.name])
        assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2]) and not torch.equal(m[0], m[2])
    again = Masking(small_cnn(3), 0.2, seed=5)
    assert all(torch.equal(again.masks[n], m) for n, m in masking.masks.items())  # same seed: same masks


# ------------------------------------------------------------------------------------------------ training
@settings(max_examples=6)
@given(method=st.sampled_from(["set", "rigl"]), k=st.integers(1, 3), density=st.sampled_from([0.05, 0.3, 0.7]),
       optimizer=st.sampled_from(["sgd", "adam"]), schedule=st.sampled_from(["cosine", "constant"]))
def test_counts_exact_and_masked_weights_and_state_stay_zero(method, k, density, optimizer, schedule):
    model = small_cnn(k)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    masking = Masking(model, density, optimizer=opt, seed=1)
    masking.apply()
    dst = DynamicSparseTraining(masking, method, total_steps=40, update_interval=3, drop_schedule=schedule)
    previous_rates = itop_stats(masking).itop_rate
    assert previous_rates == pytest.approx(masking_density_per_branch(masking))

    def check(step, changed):
        nonlocal previous_rates
        masking.check_counts()
        for name, mask in masking.masks.items():
            p = masking.params[name]
            assert not p[~mask].any(), (step, name)
            for key, state in opt.state[p].items():
                if isinstance(state, torch.Tensor) and state.shape == p.shape:
                    assert not state[~mask].any(), (step, name, key)
        rates = itop_stats(masking).itop_rate
        assert all(r >= q for r, q in zip(rates, previous_rates))  # R_s never decreases
        previous_rates = rates

    train_steps(model, masking, dst, 40, opt, check=check)
    assert dst.updates == len([s for s in range(1, 40) if s % 3 == 0 and s <= 30])
    assert all(r > d for r, d in zip(itop_stats(masking).itop_rate, masking_density_per_branch(masking)))


def masking_density_per_branch(masking):
    return [masking.density(b) for b in range(masking.branches)]


def test_static_masks_keep_r_s_at_the_density():
    model = small_cnn(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masking = Masking(model, 0.2, optimizer=opt)
    masking.apply()
    before = {n: m.clone() for n, m in masking.masks.items()}
    dst = DynamicSparseTraining(masking, "static", total_steps=20, update_interval=1)
    train_steps(model, masking, dst, 20, opt)
    assert all(torch.equal(before[n], m) for n, m in masking.masks.items())
    stats = itop_stats(masking)
    assert stats.itop_rate == pytest.approx(stats.density) and stats.density[0] == pytest.approx(0.2, abs=1e-3)


def test_pruning_removes_the_smallest_magnitudes_and_regrown_weights_start_at_zero():
    model = tiny(k=2)
    masking = Masking(model, 0.5, init="uniform", seed=3)
    masking.apply()
    with torch.no_grad():  # distinct magnitudes, random signs
        for name, p in masking.params.items():
            p.copy_(torch.randperm(p.numel()).reshape(p.shape).double().add(1) * torch.sign(torch.randn(p.shape)))
    masking.apply()
    old = {n: m.clone() for n, m in masking.masks.items()}
    values = {n: p.detach().clone() for n, p in masking.params.items()}
    dst = DynamicSparseTraining(masking, "set", total_steps=100, update_interval=1, drop_rate=0.3,
                                drop_schedule="constant")
    dst.update(0.3)
    for w in masking.layers:
        o, new = masking.branch_view(w.name, old[w.name]), masking.branch_view(w.name, masking.masks[w.name])
        v, now = masking.branch_view(w.name, values[w.name]), masking.branch_view(w.name, masking.params[w.name])
        for b in range(2):
            active = o[b].nonzero().squeeze(1)
            n = math.ceil(0.3 * len(active))  # uniform 0.5: every layer has inactive positions to regrow
            order = v[b, active].abs().argsort()
            smallest, kept = active[order[:n]], active[order[n:]]
            assert new[b, kept].all() and torch.equal(now[b, kept], v[b, kept])  # larger ones untouched
            assert (now[b, smallest] == 0).all()  # pruned (or regrown at zero)
            grown = (new[b] & ~o[b]) | (new[b] & torch.isin(torch.arange(w.numel), smallest))
            assert int(grown.sum()) == n and (now[b, grown] == 0).all()


def test_rigl_regrows_the_largest_gradients():
    model = tiny(k=2)
    masking = Masking(model, 0.4, init="uniform", seed=4)
    masking.apply()
    old = {n: m.clone() for n, m in masking.masks.items()}
    with torch.no_grad():
        for name, p in masking.params.items():
            p.copy_(torch.rand(p.shape, dtype=p.dtype) + 0.5)
            # distinct gradient magnitudes, zero on the active positions (so just-pruned ones are never regrown)
            p.grad = torch.randperm(p.numel()).reshape(p.shape).double().add(1) * (~old[name])
    masking.apply()
    dst = DynamicSparseTraining(masking, "rigl", total_steps=10, update_interval=1, drop_rate=0.25)
    dst.update(0.25)
    for w in masking.layers:
        o, new = masking.branch_view(w.name, old[w.name]), masking.branch_view(w.name, masking.masks[w.name])
        g = masking.branch_view(w.name, masking.params[w.name].grad)
        for b in range(2):
            n = min(math.ceil(0.25 * int(o[b].sum())), w.numel - int(o[b].sum()))
            grown = (new[b] & ~o[b]).nonzero().squeeze(1)
            inactive = (~o[b]).nonzero().squeeze(1)
            expected = inactive[g[b, inactive].abs().argsort(descending=True)[:n]]
            assert sorted(grown.tolist()) == sorted(expected.tolist())


def test_select_is_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    eligible = torch.tensor([True, True, True, False, True, True])
    picked = select(scores, eligible, 2, g, largest=False)
    assert len(set(picked.tolist())) == 2 and set(picked.tolist()) <= {1, 2, 5}
    assert set(select(scores, eligible, 4, g, largest=True).tolist()) >= {4, 0}
    with pytest.raises(RuntimeError, match="cannot select 6 of 5"):
        select(scores, eligible, 6, g, largest=True)


def test_branches_never_take_density_from_each_other():
    """Branch 0's weights are 1000x larger than branch 1's: a global top-k over the stacked tensor would keep only
    branch 0's; per-branch selection keeps every branch's count."""
    model = small_cnn(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masking = Masking(model, 0.2, optimizer=opt)
    with torch.no_grad():
        for name, p in masking.params.items():
            masking.branch_view(name, p.data)  # contiguous: a view
            p.view(2, -1)[0].mul_(1000)
    masking.apply()
    dst = DynamicSparseTraining(masking, "rigl", total_steps=30, update_interval=2, drop_rate=0.5)
    train_steps(model, masking, dst, 20, opt, check=lambda s, c: masking.check_counts())
    for w in masking.layers:
        assert masking.active_counts(w.name).tolist() == [masking.expected_active(w.name)] * 2


def test_updates_stop_at_update_until_and_the_cosine_schedule_decays():
    masking = Masking(tiny(), 0.5)
    dst = DynamicSparseTraining(masking, "set", total_steps=100, update_interval=10, drop_rate=0.5, update_until=0.5)
    assert [s for s in range(1, 101) if dst.is_update_step(s)] == [10, 20, 30, 40, 50]
    assert dst.rate(0) == 0.5 and dst.rate(50) == pytest.approx(0.005) and dst.rate(90) == pytest.approx(0.005)
    assert dst.rate(25) == pytest.approx(0.005 + 0.495 / 2)
    const = DynamicSparseTraining(masking, "set", total_steps=100, drop_schedule="constant", drop_rate=0.3)
    assert const.rate(70) == 0.3


def test_state_dict_resumes_exactly():
    def build():
        model = small_cnn(2, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        masking = Masking(model, 0.1, optimizer=opt, seed=2)
        masking.apply()
        return model, opt, masking, DynamicSparseTraining(masking, "set", total_steps=40, update_interval=4)

    model, opt, masking, dst = build()
    train_steps(model, masking, dst, 12, opt)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), masking.state_dict(), dst.state_dict()))
    train_steps(model, masking, dst, 12, opt, seed=9, start=13)
    assert dst.updates == 6

    model2, opt2, masking2, dst2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    masking2.load_state_dict(saved[2])
    dst2.load_state_dict(saved[3])
    train_steps(model2, masking2, dst2, 12, opt2, seed=9, start=13)
    assert all(torch.equal(masking.masks[n], masking2.masks[n]) for n in masking.masks)
    assert all(torch.equal(masking.fired[n], masking2.fired[n]) for n in masking.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    other = Masking(small_cnn(2), 0.2)
    with pytest.raises(ValueError, match="density"):
        other.load_state_dict(saved[2])


def test_an_extracted_branch_carries_its_zeros():
    model = small_cnn(2)
    masking = Masking(model, 0.1)
    masking.apply()
    for k in range(2):
        branch = extract_branch(model, k)
        plain = dict(branch.named_parameters())
        for w in masking.layers:
            m = masking.branch_view(w.name, masking.masks[w.name])[k]
            assert torch.equal(plain[w.name].reshape(-1) != 0, m)


def test_triton_backend_trains_masked_weights(triton_backend):
    model = nn.Sequential(GroupedConv2d(1, 3, 3, branches=2, padding=1), nn.Flatten(1),
                          GroupedLinear(3 * 4 * 4, 10, branches=2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):  # (N, 2, 4, 4) -> (N, 2*10)
            h = self.net[0](x).view(x.shape[0], 2, -1)
            return self.net[2](h.reshape(x.shape[0], -1))

    net = Wrap()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    masking = Masking(net, 0.3, optimizer=opt, seed=0)
    masking.apply()
    dst = DynamicSparseTraining(masking, "rigl", total_steps=6, update_interval=2)
    g = torch.Generator().manual_seed(0)
    for s in range(1, 5):
        x, y = torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x).view(4, 2, 10).transpose(0, 1).reshape(8, 10), y.repeat(2)).backward()
        opt.step()
        dst.step(s)
        masking.check_counts()
        assert all(not masking.params[n][~m].any() for n, m in masking.masks.items())
    assert dst.updates == 2


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True])
def test_density_outside_the_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match=r"density .* must be in \(0, 1\]"):
        Masking(tiny(), density)


def test_bad_options_are_refused():
    masking = Masking(tiny(), 0.5)
    with pytest.raises(ValueError, match="update interval .* must be an int >= 1, got 0"):
        DynamicSparseTraining(masking, "set", total_steps=10, update_interval=0)
    with pytest.raises(ValueError, match="dst method must be one of"):
        DynamicSparseTraining(masking, "snip", total_steps=10)
    with pytest.raises(ValueError, match="sparse init must be one of"):
        Masking(tiny(), 0.5, init="gmp")
    with pytest.raises(ValueError, match="drop rate"):
        DynamicSparseTraining(masking, "set", total_steps=10, drop_rate=1.5)
    with pytest.raises(ValueError, match="drop schedule"):
        DynamicSparseTraining(masking, "set", total_steps=10, drop_schedule="linear")
    with pytest.raises(ValueError, match="no conv or linear weights"):
        Masking(nn.Sequential(nn.BatchNorm1d(3)), 0.5)
    with pytest.raises(RuntimeError, match="needs the dense gradient"):
        DynamicSparseTraining(masking, "rigl", total_steps=10).update(0.5)


# ------------------------------------------------------------------------------------------------ complexity
def test_complexity_counts_active_weights_next_to_dense_ones():
    """Hand count: grouped conv 1->2, 3x3, K=2, bias, on 4x4: weight 36 entries at 2x2 output positions, 16 outputs.
    Dense: 16 * (9 + 1) = 160 MACs, 40 params. With 10 active weights: 10 * 4 + 16 bias adds = 56 MACs, 14 params."""
    from groupnet.complexity import complexity

    conv = GroupedConv2d(1, 2, 3, branches=2)
    mask = torch.zeros(36, dtype=torch.bool)
    mask[torch.randperm(36)[:10]] = True
    c = complexity(conv, (1, 4, 4), masks={"weight": mask.view(4, 1, 3, 3)})
    assert (c.flops, c.params, c.acts) == (160, 40, 16)
    assert (c.sparse_flops, c.sparse_params) == (56, 14)
    assert c.per_branch["sparse_flops"] == 28 and "active weights" in c.table()
    assert complexity(conv, (1, 4, 4)).sparse_flops is None
    with pytest.raises(ValueError, match="not a parameter"):
        complexity(conv, (1, 4, 4), masks={"conv.weight": mask})


@settings(max_examples=4)
@given(density=st.sampled_from([0.1, 0.5, 1.0]), k=st.integers(1, 3))
def test_sparse_counts_are_density_times_dense_counts(density, k):
    from groupnet.complexity import complexity

    model = small_cnn(k)
    masking = Masking(model, density)
    c = complexity(model, (1, 8, 8), masks=masking.masks)
    dense_weights = sum(w.numel * k for w in masking.layers)
    active = sum(int(m.sum()) for m in masking.masks.values())
    assert c.sparse_params == c.params - dense_weights + active
    expected = 0
    for layer in c.layers:
        name = layer.name + ".weight"
        d = masking.density_of(name) if name in masking.masks else 1.0
        bias_adds = layer.acts * (model.get_submodule(layer.name).bias is not None)
        expected += round(d * (layer.flops - bias_adds)) + bias_adds
    assert c.sparse_flops == expected
    if density == 1.0:
        assert (c.sparse_flops, c.sparse_params) == (c.flops, c.params)
