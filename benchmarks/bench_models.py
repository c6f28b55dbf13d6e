"""Model level: split WRN-16-4 and ResNet-56 (CIFAR 32x32), K = 2 and 4, training step and inference.

All peers of one case run one after another (same process, same data, same starting weights); the report compares
their medians. Rounds per case are in ``cases.ModelCase.rounds``.
"""

from __future__ import annotations

import pytest

from cases import model_cases
from peers import PEERS, make_runner

CASES = [(case, peer) for case in model_cases() for peer in PEERS if case.compiles or "compile" not in peer]


@pytest.mark.parametrize("case,peer", CASES, ids=[f"{c.id}-{p}" for c, p in CASES])
def test_model(benchmark, case, peer):
    run = make_runner(peer, case)
    benchmark.group = case.id
    benchmark.extra_info.update(level="model", case=case.id, peer=peer, arch=case.arch, branches=case.branches,
                                batch=case.batch, mode=case.mode)
    warmup, rounds = case.rounds
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
