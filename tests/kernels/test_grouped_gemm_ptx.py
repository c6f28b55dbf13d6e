"""What the grouped GEMM's operand loads compile to (offline, no GPU): 16-byte ``cp.async`` copies in every pass on
sm_80, TMA (``cp.async.bulk.tensor``) and ``wgmma`` on sm_90.

The builds mark every pointer and int argument divisible by 16, as the JIT does for a launch whose sizes and strides
are multiples of 16 (``TmaCompileSpec``), and make the unit strides of contiguous operands constexpr 1. Kernels
cannot be compiled under TRITON_INTERPRET=1 (set for the whole session by tests/conftest.py), so the compiles run in
a subprocess without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PASSES = ("forward", "backward_input", "backward_weight")

_SCRIPT = r"""
import json, re
from groupnet.kernels import grouped_gemm as gg, grouped_gemm_tma as tma

def summary(ptx):
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], (\w+)", ptx)
    return {
        "cp_async_16": copies.count("0x10"),
        "cp_async_other": len(copies) - copies.count("0x10"),
        "ld_global": len(re.findall(r"\bld\.global", ptx)),
        "bulk_tensor": ptx.count("cp.async.bulk.tensor"),
        "wgmma": ptx.count("wgmma.mma_async"),
    }

out = {}
cfg = gg.TENSOR_CORE_CONFIGS[1]  # 128 x 64 x 32, 4 warps, 4 stages
for p in %(passes)r:
    spec = tma.aligned_spec(gg.grouped_gemm_kernel, cfg, "fp16", p, "ieee")
    out["cp_async_sm80_" + p] = summary(spec.compile(80).asm["ptx"])
tma_cfg = tma.TMA_CONFIGS_16BIT[1]  # 128 x 128 x 64, 8 warps, 4 stages
for p in %(passes)r:
    out["tma_sm90_" + p] = summary(tma.tma_spec(tma_cfg, "bf16", p, "ieee").compile(90).asm["ptx"])
out["cfg"] = [cfg.kwargs, cfg.num_warps, cfg.num_stages]
print(json.dumps(out))
""" % {"passes": PASSES}


@pytest.fixture(scope="module")
def load_summary(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", PASSES)
def test_sm80_operand_loads_are_16_byte_cp_async_in_every_pass(load_summary, pass_name):
    """Both fp16 operand tiles of every stage are 16-byte cp.async copies: num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K
    x 2 bytes / 16 per 32*num_warps threads, and no operand is read by ordinary loads (the forward's ld.global are
    its bias)."""
    got = load_summary[f"cp_async_sm80_{pass_name}"]
    kw, warps, stages = load_summary["cfg"]
    expected = stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 2 // 16 // (32 * warps)
    assert got["cp_async_16"] == expected, got
    assert got["cp_async_other"] == 0, got
    if pass_name != "forward":
        assert got["ld_global"] == 0, got


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", PASSES)
def test_sm90_tma_kernel_uses_tma_loads_and_wgmma(load_summary, pass_name):
    got = load_summary[f"tma_sm90_{pass_name}"]
    assert got["bulk_tensor"] > 0 and got["wgmma"] > 0, got
    assert got["cp_async_16"] == 0 and got["cp_async_other"] == 0, got
    if pass_name != "forward":
        assert got["ld_global"] == 0, got
