"""retain_freed_memory: after it, a large tensor freed and allocated again reuses memory instead of faulting it in."""

import os
import subprocess
import sys
import textwrap

import pytest

# Allocate, touch and free a 64 MiB tensor (16384 pages of 4 KiB) ten times; print the minor page faults taken.
# The models are imported first, as in a training process (the trainer calls retain_freed_memory with its stack
# loaded): in a process that has imported torch alone, the heap's layout leaves most rounds faulting anyway.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    import groupnet.models
    from groupnet.cpu_memory import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    torch.ones(16 << 20)  # first use: every page is new either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 << 20)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own tuning variables
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    applied, count = out.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = faults("retain")
    _, default = faults("default")
    assert applied == "True"
    assert default > 10 * 16384 // 2, f"glibc served 64 MiB blocks without faulting them in ({default} faults)"
    assert retained < default // 10, f"{retained} page faults with freed memory retained, {default} without"
